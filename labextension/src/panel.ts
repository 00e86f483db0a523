/** The sidebar: every compute with a status badge, resources, GPU use and idle time, refreshed live. */
import { showErrorMessage } from '@jupyterlab/apputils';
import { addIcon, refreshIcon } from '@jupyterlab/ui-components';
import { Message } from '@lumino/messaging';
import { Widget } from '@lumino/widgets';

import {
  IBackend,
  ICompute,
  IComputeList,
  launchCompute,
  listComputes,
  stopCompute
} from './api';
import { askNewCompute, confirmStop } from './dialogs';
import { activityText, formatBytes, formatDuration, formatResources, phaseWord } from './format';

/** How often the list refreshes while the sidebar is visible. */
export const REFRESH_MS = 3000;

/** What the panel asks its host to do. */
export interface IComputesPanelOptions {
  /** Open the log view of a compute. */
  openLogs: (c: ICompute) => void;
}

/** The sidebar panel listing computes. */
export class ComputesPanel extends Widget {
  constructor(private readonly options: IComputesPanelOptions) {
    super();
    this.addClass('kt-ComputesPanel');
    const header = el('div', 'kt-ComputesPanel-header');
    header.append(
      el('h2', 'kt-ComputesPanel-title', 'Computes'),
      this.toolButton('New compute', addIcon.element({ tag: 'span' }), () => void this.newCompute()),
      this.toolButton('Refresh', refreshIcon.element({ tag: 'span' }), () => void this.refresh())
    );
    this._status = el('div', 'kt-ComputesPanel-status');
    this._list = el('ul', 'kt-ComputesPanel-list');
    this.node.append(header, this._status, this._list);
  }

  /** Fetch the list now and render it. */
  async refresh(): Promise<void> {
    try {
      const data = await listComputes();
      this._backends = data.backends;
      this.render(data);
      this._status.textContent = '';
      this._status.classList.remove('kt-mod-error');
    } catch (error) {
      this._status.textContent = `Cannot list computes: ${(error as Error).message}`;
      this._status.classList.add('kt-mod-error');
    }
  }

  /** Ask for a spec, launch it, and show it while it starts. */
  async newCompute(): Promise<void> {
    const spec = await askNewCompute(this._backends);
    if (!spec) {
      return;
    }
    this._launching.add(spec.name);
    void this.refresh();
    try {
      await launchCompute(spec);
    } catch (error) {
      void showErrorMessage(`Cannot launch ${spec.name}`, (error as Error).message);
    } finally {
      this._launching.delete(spec.name);
      void this.refresh();
    }
  }

  /** Confirm, then stop a compute. */
  async stop(c: ICompute): Promise<void> {
    if (!(await confirmStop(c))) {
      return;
    }
    this._stopping.add(key(c));
    void this.refresh();
    try {
      await stopCompute(c);
    } catch (error) {
      void showErrorMessage(`Cannot stop ${c.name}`, (error as Error).message);
    } finally {
      this._stopping.delete(key(c));
      void this.refresh();
    }
  }

  protected onAfterShow(msg: Message): void {
    this.schedule(0);
  }

  protected onAfterAttach(msg: Message): void {
    this.schedule(0);
  }

  protected onBeforeHide(msg: Message): void {
    this.unschedule();
  }

  protected onBeforeDetach(msg: Message): void {
    this.unschedule();
  }

  /** Poll: refresh, then again REFRESH_MS after it finished, while visible. */
  private schedule(delayMs: number): void {
    this.unschedule();
    if (!this.isVisible) {
      return;
    }
    this._timer = window.setTimeout(async () => {
      await this.refresh();
      if (this._timer !== null) {
        this.schedule(REFRESH_MS);
      }
    }, delayMs);
  }

  private unschedule(): void {
    if (this._timer !== null) {
      window.clearTimeout(this._timer);
      this._timer = null;
    }
  }

  private render(data: IComputeList): void {
    const items = data.computes.map(c => this.item(c));
    const shown = new Set(data.computes.map(c => c.name));
    for (const name of this._launching) {
      if (!shown.has(name)) {
        const li = el('li', 'kt-Compute');
        li.append(row(el('span', 'kt-Compute-name', name), badge('launching')));
        items.push(li);
      }
    }
    if (!items.length) {
      const empty = el('li', 'kt-ComputesPanel-empty');
      empty.innerHTML = 'No computes yet. Run a <code>%%kt</code> cell, or click <b>+</b> to launch one.';
      items.push(empty);
    }
    this._list.replaceChildren(...items);
  }

  private item(c: ICompute): HTMLElement {
    const li = el('li', 'kt-Compute');
    li.dataset.name = c.name;
    li.dataset.backend = c.backend;
    const phase = phaseWord(c.phase);
    li.dataset.phase = phase;
    const name = el('span', 'kt-Compute-name', c.name);
    name.title = c.name;
    li.append(
      row(name, badge(this._stopping.has(key(c)) ? 'stopping' : phase)),
      el('div', 'kt-Compute-resources', `${c.backend} · ${formatResources(c.resources)}`)
    );
    const m = c.metrics;
    if (m && phase === 'ready') {
      const activity = el('span', m.running ? 'kt-Compute-activity kt-mod-running' : 'kt-Compute-activity',
                          activityText(!!m.running, c.idle_s));
      const usage = el('div', 'kt-Compute-usage');
      usage.append(activity, ` · age ${formatDuration(c.age_s)}`);
      li.append(
        usage,
        el('div', 'kt-Compute-usage', `CPU ${Math.round(m.cpu_percent ?? 0)}% · RAM ${formatBytes(m.rss_bytes)}`)
      );
    } else {
      const why = c.detail || c.metrics_error;
      li.append(el('div', 'kt-Compute-usage', why ? `${c.where} · ${why}` : c.where));
    }
    for (const g of c.gpus) {
      const mem = g.memory_total_bytes
        ? ` · ${formatBytes(g.memory_used_bytes)} / ${formatBytes(g.memory_total_bytes)}`
        : '';
      const gpu = el('div', 'kt-Compute-gpu', `GPU${g.index}: ${g.utilization_percent ?? '?'}%${mem}`);
      gpu.title = g.name ?? '';
      li.append(gpu);
    }
    const actions = el('div', 'kt-Compute-actions');
    actions.append(
      button('Logs', `Show the log of ${c.name}`, () => this.options.openLogs(c)),
      button('Stop', `Stop ${c.name}`, () => void this.stop(c), 'kt-mod-stop')
    );
    li.append(actions);
    return li;
  }

  private toolButton(title: string, icon: HTMLElement, onClick: () => void): HTMLElement {
    const b = button('', title, onClick, 'kt-ComputesPanel-tool');
    b.appendChild(icon);
    return b;
  }

  private _backends: IBackend[] = [];
  private _launching = new Set<string>();
  private _stopping = new Set<string>();
  private _status: HTMLElement;
  private _list: HTMLElement;
  private _timer: number | null = null;
}

function key(c: ICompute): string {
  return `${c.backend}/${c.name}`;
}

function el(tag: string, className: string, text?: string): HTMLElement {
  const node = document.createElement(tag);
  node.className = className;
  if (text !== undefined) {
    node.textContent = text;
  }
  return node;
}

function row(...children: HTMLElement[]): HTMLElement {
  const div = el('div', 'kt-Compute-row');
  div.append(...children);
  return div;
}

function badge(phase: string): HTMLElement {
  const span = el('span', `kt-Badge kt-Badge-${phase}`, phase);
  span.title = `phase: ${phase}`;
  return span;
}

function button(label: string, title: string, onClick: () => void, extra = ''): HTMLButtonElement {
  const b = el('button', `jp-Button kt-Button ${extra}`.trim(), label) as HTMLButtonElement;
  b.title = title;
  b.setAttribute('aria-label', title);
  b.addEventListener('click', onClick);
  return b;
}
