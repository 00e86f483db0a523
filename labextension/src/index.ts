/** The kt_jupyter JupyterLab extension: a left-sidebar panel of computes. */
import {
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ICommandPalette, MainAreaWidget } from '@jupyterlab/apputils';
import { LabIcon } from '@jupyterlab/ui-components';

import { ICompute } from './api';
import { LogsView } from './logs';
import { ComputesPanel } from './panel';

/** A small server-rack icon, themed like JupyterLab's own. */
const ktIcon = new LabIcon({
  name: 'kt-jupyter:computes',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" width="16" viewBox="0 0 24 24">' +
    '<g class="jp-icon3" fill="#616161">' +
    '<path d="M4 3h16a1 1 0 0 1 1 1v5a1 1 0 0 1-1 1H4a1 1 0 0 1-1-1V4a1 1 0 0 1 1-1zm0 11h16a1 1 0 0 1 1 1v5a1 1 0 0 1-1 1H4a1 1 0 0 1-1-1v-5a1 1 0 0 1 1-1zm3-8.5a1.5 1.5 0 1 0 0 3 1.5 1.5 0 0 0 0-3zm0 11a1.5 1.5 0 1 0 0 3 1.5 1.5 0 0 0 0-3zM11 6v2h7V6h-7zm0 11v2h7v-2h-7z"/>' +
    '</g></svg>'
});

const COMMANDS = {
  open: 'kt:open-computes',
  refresh: 'kt:refresh-computes',
  create: 'kt:new-compute'
};

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'kt-jupyter-labextension:sidebar',
  description: 'A sidebar of kt_jupyter computes: status, resources, GPU use, idle time, logs, stop, launch.',
  autoStart: true,
  optional: [ILayoutRestorer, ICommandPalette],
  activate: (app: JupyterFrontEnd, restorer: ILayoutRestorer | null, palette: ICommandPalette | null) => {
    const logViews = new Map<string, MainAreaWidget<LogsView>>();
    const openLogs = (c: ICompute) => {
      const id = `${c.backend}/${c.name}`;
      let view = logViews.get(id);
      if (!view || view.isDisposed) {
        view = new MainAreaWidget({ content: new LogsView(c) });
        view.id = `kt-logs-${c.backend}-${c.name}`;
        view.title.label = `Logs: ${c.name}`;
        view.title.icon = ktIcon;
        logViews.set(id, view);
        app.shell.add(view, 'main', { mode: 'split-bottom' });
      }
      app.shell.activateById(view.id);
    };

    const panel = new ComputesPanel({ openLogs });
    panel.id = 'kt-computes';
    panel.title.icon = ktIcon;
    panel.title.caption = 'Computes (kt)';
    app.shell.add(panel, 'left', { rank: 650 });
    restorer?.add(panel, 'kt-computes');

    app.commands.addCommand(COMMANDS.open, {
      label: 'Show Computes',
      execute: () => app.shell.activateById(panel.id)
    });
    app.commands.addCommand(COMMANDS.refresh, {
      label: 'Refresh Computes',
      execute: () => panel.refresh()
    });
    app.commands.addCommand(COMMANDS.create, {
      label: 'New Compute…',
      execute: () => panel.newCompute()
    });
    for (const command of Object.values(COMMANDS)) {
      palette?.addItem({ command, category: 'kt computes' });
    }
  }
};

export default plugin;
