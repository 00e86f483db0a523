/** The sidebar's dialogs: the "New compute" form (our picker) and the stop confirmation. */
import { Dialog, showDialog } from '@jupyterlab/apputils';
import { Widget } from '@lumino/widgets';

import { IBackend, ICompute, IComputeSpec } from './api';

/** The form fields, in order: [key, label, placeholder]. */
const FIELDS: ReadonlyArray<[keyof IComputeSpec, string, string]> = [
  ['name', 'Name', 'train'],
  ['cpus', 'CPUs', 'e.g. 2 or 500m'],
  ['memory', 'Memory', 'e.g. 4Gi'],
  ['gpus', 'GPUs', 'e.g. 1']
];

/** The body of the "New compute" dialog: name, backend, cpus, memory, gpus. */
export class NewComputeForm extends Widget implements Dialog.IBodyWidget<IComputeSpec> {
  constructor(backends: IBackend[]) {
    super({ node: document.createElement('form') });
    this.addClass('kt-NewComputeForm');
    this.node.addEventListener('submit', event => event.preventDefault());
    for (const [key, label, placeholder] of FIELDS) {
      const input = document.createElement('input');
      input.name = key;
      input.placeholder = placeholder;
      input.className = 'jp-mod-styled';
      if (key === 'name') {
        input.required = true;
        input.value = 'default';
      }
      this.node.appendChild(row(label, input));
      if (key === 'name') {
        this.node.appendChild(row('Backend', this.backendSelect(backends)));
      }
    }
  }

  /** The spec the user entered; empty fields are left to the server's defaults. */
  getValue(): IComputeSpec {
    const form = this.node as HTMLFormElement;
    const value = (key: string) => (form.elements.namedItem(key) as HTMLInputElement).value.trim();
    const spec: IComputeSpec = { name: value('name'), backend: value('backend') };
    for (const key of ['cpus', 'memory', 'gpus'] as const) {
      if (value(key)) {
        spec[key] = value(key);
      }
    }
    return spec;
  }

  private backendSelect(backends: IBackend[]): HTMLSelectElement {
    const select = document.createElement('select');
    select.name = 'backend';
    select.className = 'jp-mod-styled';
    const known = backends.length ? backends : [{ name: 'local', available: true, message: '' }];
    for (const b of known) {
      const option = new Option(b.available ? b.name : `${b.name} (unavailable)`, b.name);
      option.disabled = !b.available;
      option.title = b.message;
      select.add(option);
    }
    return select;
  }
}

function row(label: string, input: HTMLElement): HTMLElement {
  const wrapper = document.createElement('label');
  wrapper.className = 'kt-NewComputeForm-row';
  const text = document.createElement('span');
  text.textContent = label;
  wrapper.append(text, input);
  return wrapper;
}

/** Ask for a new compute's spec; null when cancelled. */
export async function askNewCompute(backends: IBackend[]): Promise<IComputeSpec | null> {
  const result = await showDialog({
    title: 'New compute',
    body: new NewComputeForm(backends),
    buttons: [Dialog.cancelButton(), Dialog.okButton({ label: 'Launch' })],
    focusNodeSelector: 'input'
  });
  return result.button.accept ? result.value : null;
}

/** Confirm stopping a compute. */
export async function confirmStop(c: ICompute): Promise<boolean> {
  const result = await showDialog({
    title: `Stop ${c.name}?`,
    body: `The ${c.backend} compute "${c.name}" stops and its variables are lost.`,
    buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: 'Stop' })]
  });
  return result.button.accept;
}
