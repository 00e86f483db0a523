/**
 * Host page of tests/browser/test_vscode_widgets_browser.py: VS Code's ipywidgets 8 widget manager on a live kernel.
 *
 * What is VS Code's own code here, unmodified:
 *   - ipywidgets.js: the prebuilt bundle of @vscode/jupyter-ipywidgets8, the exact file VS Code's Jupyter
 *     extension loads as a notebook preload (an ES module exporting `activate`). It is served as is, not rebundled.
 *   - labvariables.css from @jupyter-widgets/controls, which VS Code's webview-side widget manager imports.
 * RequireJS is on the page as in VS Code (the bundle's loadClass falls back to `requirejs` for the @jupyter-widgets
 * modules its `load()` defines there): npm's requirejs 2.3.6, where VS Code ships its own patched copy of 2.3.6.
 * What this file re-implements, following microsoft/vscode-jupyter
 * src/webviews/webview-side/ipywidgets/kernel/{index.ts,manager.ts} (same steps, same order):
 *   - activate() → vscIPyWidgets8.load() → new vscIPyWidgets.WidgetManager(kernel, el, scriptLoader, logger);
 *   - on every iopub display_data/execute_result with the widget mime type: prime the model (get_model), and
 *     render it into the output's node: wait for the priming, get_model → create_view(model, {el}) →
 *     display_view(data, view, {node}), inside the same `cell-output-ipywidget-background` DOM VS Code builds.
 * What differs from VS Code:
 *   - Transport: VS Code's webview gets a @jupyterlab/services KernelConnection whose socket is a postMessage proxy
 *     to the extension host's connection. Here the manager's KernelConnection (same class) has a real WebSocket
 *     to the same kernel, and cells run on a second connection (the "extension host" side); iopub reaches both.
 *   - No VS Code shell: no notebook editor, no renderer CSS or --vscode-* theme variables (VS Code maps
 *     --jp-* variables to its theme); cells are plain divs and stream/text outputs are drawn as <pre>.
 */

import '@jupyter-widgets/controls/css/labvariables.css';
import { Kernel, KernelAPI, KernelConnection, KernelMessage, ServerConnection } from '@jupyterlab/services';

const WIDGET_MIMETYPE = 'application/vnd.jupyter.widget-view+json';

interface Deferred<T> {
    promise: Promise<T>;
    resolve(value: T): void;
    reject(reason: unknown): void;
}

function createDeferred<T = void>(): Deferred<T> {
    let resolve!: (value: T) => void;
    let reject!: (reason: unknown) => void;
    const promise = new Promise<T>((res, rej) => {
        resolve = res;
        reject = rej;
    });
    return { promise, resolve, reject };
}

type WidgetData = { model_id: string; version_major: number };

/** The subset of VS Code's IJupyterLabWidgetManager this page uses. */
interface VscWidgetManager {
    get_model(modelId: string): Promise<any> | undefined;
    create_view(model: any, options: { el: HTMLElement }): Promise<any>;
    display_view(data: any, view: any, options: { node: HTMLElement }): Promise<{ dispose(): void }>;
    onUnhandledIOPubMessage: { connect(fn: (sender: unknown, msg: KernelMessage.IIOPubMessage) => void): void };
}

type VscWidgetManagerCtor = new (
    kernel: Kernel.IKernelConnection,
    el: HTMLElement | undefined,
    scriptLoader: {
        readonly widgetsRegisteredInRequireJs: Readonly<Set<string>>;
        errorHandler(className: string, moduleName: string, moduleVersion: string, error: any): void;
        loadWidgetScript(moduleName: string, moduleVersion: string): Promise<void>;
        successHandler(className: string, moduleName: string, moduleVersion: string): void;
    },
    logger: (message: string) => void,
    widgetState?: unknown
) => VscWidgetManager;

/** What the test reads (window.ktHost). */
const host = {
    state: 'starting' as 'starting' | 'ready' | 'failed',
    error: '',
    kernelId: '',
    /** scriptLoader.errorHandler calls: widget classes the manager could not load. */
    widgetLoadErrors: [] as string[],
    /** scriptLoader.loadWidgetScript calls: third-party widget modules the manager asked for. */
    widgetScriptRequests: [] as string[],
    /** Loaded widget classes (scriptLoader.successHandler). */
    widgetLoads: [] as string[],
    /** Failures of the render sequence. */
    renderErrors: [] as string[],
    /** The manager's logger output (VS Code's logMessage). */
    log: [] as string[],
    /** Iopub messages the manager did not handle (VS Code forwards these to the extension host). */
    unhandledIOPub: [] as string[],
    /** Widgets attached to the page. */
    rendered: 0,
    run: (_code: string): number => {
        throw new Error('host not ready');
    }
};
(window as any).ktHost = host;

function loadClassicScript(src: string): Promise<void> {
    return new Promise((resolve, reject) => {
        const script = document.createElement('script');
        script.src = src;
        script.onload = () => resolve();
        script.onerror = () => reject(new Error(`could not load ${src}`));
        document.head.appendChild(script);
    });
}

function stripAnsi(text: string): string {
    // eslint-disable-next-line no-control-regex
    return text.replace(/\u001b\[[0-9;]*[A-Za-z]/g, '');
}

// ------------------------------------------------------------------ VS Code's webview-side WidgetManager wrapper

let manager: VscWidgetManager;
/** model_id → resolved once the manager has the model (VS Code's modelIdsToBeDisplayed). */
const modelIdsToBeDisplayed = new Map<string, Deferred<void>>();

/** VS Code's handleDisplayDataMessage: prime the model of every widget display on the manager's kernel. */
async function handleDisplayDataMessage(_sender: unknown, payload: KernelMessage.IIOPubMessage): Promise<void> {
    if (!KernelMessage.isDisplayDataMsg(payload) && !KernelMessage.isExecuteResultMsg(payload)) {
        return;
    }
    const data = payload.content?.data?.[WIDGET_MIMETYPE] as WidgetData | undefined;
    if (!data) {
        return;
    }
    const modelId = data.model_id;
    host.log.push(`Received display data message ${modelId}`);
    let deferred = modelIdsToBeDisplayed.get(modelId);
    if (!deferred) {
        deferred = createDeferred();
        modelIdsToBeDisplayed.set(modelId, deferred);
    }
    const modelPromise = manager.get_model(modelId);
    if (modelPromise) {
        try {
            await modelPromise;
            deferred.resolve();
        } catch (ex) {
            deferred.reject(ex);
        }
    } else {
        deferred.resolve();
    }
}

/** VS Code's WidgetManager.renderWidget: get_model → create_view → display_view into `ele`. */
async function renderWidget(data: WidgetData, ele: HTMLElement): Promise<{ dispose(): void } | undefined> {
    if (!data || data.version_major !== 2) {
        console.warn('Widget data not available to render an ipywidget');
        return undefined;
    }
    const modelId = data.model_id;
    if (!modelIdsToBeDisplayed.has(modelId)) {
        modelIdsToBeDisplayed.set(modelId, createDeferred());
    }
    await modelIdsToBeDisplayed.get(modelId)!.promise;
    const modelPromise = manager.get_model(modelId);
    if (!modelPromise) {
        console.warn('Widget model not available to render an ipywidget');
        return undefined;
    }
    const model = await modelPromise;
    const view = await manager.create_view(model, { el: ele });
    return manager.display_view(data, view, { node: ele });
}

/** VS Code's renderIPyWidget: the output's DOM, then the render sequence. */
function renderIPyWidget(data: WidgetData, container: HTMLElement): void {
    const output = document.createElement('div');
    output.className = 'cell-output cell-output';
    const ele = document.createElement('div');
    ele.className = 'cell-output-ipywidget-background';
    ele.setAttribute('tabindex', '0');
    ele.setAttribute('role', 'region');
    ele.setAttribute('aria-label', 'Interactive widget output');
    container.appendChild(ele);
    ele.appendChild(output);
    renderWidget(data, ele)
        .then((widget) => {
            if (widget) {
                host.rendered += 1;
                container.dataset.rendered = 'true';
            }
        })
        .catch((ex) => {
            const message = `Failed to render ${data.model_id}: ${ex}`;
            host.renderErrors.push(message);
            console.error(message);
        });
}

// ------------------------------------------------------------------ the notebook stand-in (cells, outputs)

/** parent msg_id → the outputs element of its cell (outputs from threads come after the reply too). */
const outputsByMsgId = new Map<string, HTMLElement>();

function appendText(outputs: HTMLElement, kind: string, text: string): void {
    const last = outputs.lastElementChild as HTMLElement | null;
    if (last && last.dataset.kind === kind) {
        last.textContent += text;
        return;
    }
    const pre = document.createElement('pre');
    pre.className = `output output-${kind}`;
    pre.dataset.kind = kind;
    pre.textContent = text;
    outputs.appendChild(pre);
}

/** Draw the iopub outputs of cells run by this page (the extension host's side in VS Code). */
function handleCellOutput(_sender: unknown, msg: KernelMessage.IIOPubMessage): void {
    const parentId = (msg.parent_header as KernelMessage.IHeader | undefined)?.msg_id;
    const outputs = parentId ? outputsByMsgId.get(parentId) : undefined;
    if (!outputs) {
        return;
    }
    if (KernelMessage.isStreamMsg(msg)) {
        appendText(outputs, msg.content.name, msg.content.text);
    } else if (KernelMessage.isDisplayDataMsg(msg) || KernelMessage.isExecuteResultMsg(msg)) {
        const data = msg.content.data;
        if (data[WIDGET_MIMETYPE]) {
            const container = document.createElement('div');
            container.className = 'output output-widget';
            outputs.appendChild(container);
            renderIPyWidget(data[WIDGET_MIMETYPE] as unknown as WidgetData, container);
        } else if (typeof data['text/plain'] === 'string') {
            appendText(outputs, 'text', `${data['text/plain']}\n`);
        }
    } else if (KernelMessage.isErrorMsg(msg)) {
        appendText(outputs, 'error', stripAnsi(msg.content.traceback.join('\n')) + '\n');
    }
}

function addCell(code: string): { cell: HTMLElement; outputs: HTMLElement } {
    const cells = document.getElementById('cells')!;
    const cell = document.createElement('div');
    cell.className = 'cell';
    cell.dataset.cell = String(cells.children.length);
    cell.dataset.status = 'running';
    const source = document.createElement('pre');
    source.className = 'source';
    source.textContent = code;
    const outputs = document.createElement('div');
    outputs.className = 'outputs';
    cell.append(source, outputs);
    cells.appendChild(cell);
    return { cell, outputs };
}

// ------------------------------------------------------------------ start

async function main(): Promise<void> {
    const token = new URLSearchParams(location.search).get('token') ?? '';
    const serverSettings = ServerConnection.makeSettings({
        baseUrl: `${location.origin}/`,
        wsUrl: `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/`,
        token,
        appendToken: true
    });

    // VS Code's preloads: RequireJS, then the ipywidgets 8 bundle's activate(); on the kernel's widget version (8)
    // the kernel preload calls vscIPyWidgets8.load() and takes vscIPyWidgets.WidgetManager.
    await loadClassicScript(new URL('./require.js', import.meta.url).href);
    // a computed URL: esbuild leaves the import alone, so the browser loads VS Code's file as published
    const widgets8 = await import(new URL('./ipywidgets.js', import.meta.url).href);
    widgets8.activate();
    (window as any).vscIPyWidgets8.load();
    const JupyterLabWidgetManager = (window as any).vscIPyWidgets?.WidgetManager as VscWidgetManagerCtor | undefined;
    if (!JupyterLabWidgetManager) {
        throw new Error('JupyterLabWidgetManager not defined by @vscode/jupyter-ipywidgets8');
    }

    // The kernel, and the two connections to it: cells run on `extension` (VS Code's extension host side), the
    // widget manager gets `webview`, which sees the same iopub stream (VS Code forwards it over postMessage).
    // As in VS Code, the kernel was started outside the webview (here by the test, through the server's REST API:
    // a page polling GET /api/kernels while a kernel starts meets jupyter_server's 500 for a kernel without its
    // last_activity yet); the page only connects to it, by the id in its URL.
    const kernelId = new URLSearchParams(location.search).get('kernel') ?? '';
    const model = await KernelAPI.getKernelModel(kernelId, serverSettings);
    if (!model) {
        throw new Error(`no kernel ${kernelId} on the server`);
    }
    host.kernelId = model.id;
    const extension = new KernelConnection({ model, serverSettings, handleComms: false });
    const webview = new KernelConnection({ model, serverSettings, handleComms: true });
    await Promise.all([extension.info, webview.info]);

    manager = new JupyterLabWidgetManager(
        webview,
        undefined, // VS Code passes no container: every view gets its output's node
        {
            widgetsRegisteredInRequireJs: new Set<string>(),
            errorHandler: (className, moduleName, moduleVersion, error) => {
                const message = `${moduleName}@${moduleVersion}:${className}: ${error}`;
                host.widgetLoadErrors.push(message);
                console.error(`Failed to load widget class ${message}`);
            },
            loadWidgetScript: async (moduleName, moduleVersion) => {
                // VS Code asks the extension host for the module's script (CDN or local); this page has none.
                host.widgetScriptRequests.push(`${moduleName}@${moduleVersion}`);
            },
            successHandler: (className, moduleName, moduleVersion) => {
                host.widgetLoads.push(`${moduleName}@${moduleVersion}:${className}`);
            }
        },
        (message: string) => host.log.push(message)
    );
    webview.iopubMessage.connect(handleDisplayDataMessage);
    manager.onUnhandledIOPubMessage.connect((_sender, msg) => host.unhandledIOPub.push(msg.header.msg_type));
    extension.iopubMessage.connect(handleCellOutput);

    host.run = (code: string): number => {
        const { cell, outputs } = addCell(code);
        const future = extension.requestExecute({ code, stop_on_error: false }, false);
        outputsByMsgId.set(future.msg.header.msg_id, outputs);
        future.done
            .then((reply) => {
                const content = (reply as KernelMessage.IExecuteReplyMsg | undefined)?.content;
                cell.dataset.status = content?.status ?? 'unknown';
                if (content?.execution_count) {
                    cell.dataset.count = String(content.execution_count);
                }
            })
            .catch((ex) => {
                cell.dataset.status = 'failed';
                appendText(outputs, 'error', `${ex}\n`);
            });
        return Number(cell.dataset.cell);
    };
}

main()
    .then(() => {
        host.state = 'ready';
        document.body.dataset.state = 'ready';
    })
    .catch((ex) => {
        host.state = 'failed';
        host.error = String(ex?.stack ?? ex);
        document.body.dataset.state = 'failed';
        console.error('host failed to start', ex);
    });
