/** A main-area view of a compute's log tail that follows new lines while it is visible. */
import { Widget } from '@lumino/widgets';
import { Message } from '@lumino/messaging';

import { computeLogs, ICompute } from './api';

/** How often an open log view fetches the tail again. */
const LOG_REFRESH_MS = 2000;

/** The last lines of one compute's log, refreshed every couple of seconds while shown. */
export class LogsView extends Widget {
  constructor(readonly compute: ICompute) {
    super();
    this.addClass('kt-LogsView');
    this.id = `kt-logs-${compute.backend}-${compute.name}`;
    this.title.label = `Logs: ${compute.name}`;
    this.title.closable = true;
    this._pre = document.createElement('pre');
    this.node.appendChild(this._pre);
  }

  /** Fetch the tail now; keeps the view scrolled to the end if it was there. */
  async refresh(): Promise<void> {
    let text: string;
    try {
      text = (await computeLogs(this.compute)) || '(the log is empty)';
    } catch (error) {
      text = `${this._pre.textContent ? this._pre.textContent + '\n\n' : ''}[${(error as Error).message}]`;
      this._stop();
    }
    const atEnd = this.node.scrollTop + this.node.clientHeight >= this.node.scrollHeight - 4;
    this._pre.textContent = text;
    if (atEnd) {
      this.node.scrollTop = this.node.scrollHeight;
    }
  }

  protected onAfterShow(msg: Message): void {
    this._start();
  }

  protected onAfterAttach(msg: Message): void {
    this._start();
  }

  protected onBeforeHide(msg: Message): void {
    this._stop();
  }

  protected onBeforeDetach(msg: Message): void {
    this._stop();
  }

  private _start(): void {
    if (this._timer === null && this.isVisible) {
      void this.refresh();
      this._timer = window.setInterval(() => void this.refresh(), LOG_REFRESH_MS);
    }
  }

  private _stop(): void {
    if (this._timer !== null) {
      window.clearInterval(this._timer);
      this._timer = null;
    }
  }

  private _pre: HTMLPreElement;
  private _timer: number | null = null;
}
