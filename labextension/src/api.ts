/**
 * Typed client of the kt server extension's REST API (`/kt/api/`).
 *
 * Requests go through ServerConnection, so they carry the server's token
 * and XSRF cookie like every other JupyterLab request.
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

/** One GPU as the pod kernel samples it. */
export interface IGpu {
  index: number;
  name?: string | null;
  utilization_percent?: number | null;
  memory_used_bytes?: number | null;
  memory_total_bytes?: number | null;
}

/** One live resource sample of a pod kernel. */
export interface IMetrics {
  cpu_percent?: number;
  rss_bytes?: number;
  host_memory_total_bytes?: number;
  idle_s?: number;
  uptime_s?: number;
  cells_run?: number;
  running?: string | null;
  gpus?: IGpu[];
}

/** One compute as `GET /kt/api/computes` lists it. */
export interface ICompute {
  name: string;
  backend: string;
  phase: string;
  where: string;
  detail: string;
  pid: number | null;
  age_s: number | null;
  resources: Record<string, string | number>;
  idle_s: number | null;
  gpus: IGpu[];
  metrics: IMetrics | null;
  metrics_error: string | null;
}

/** Whether a backend could be asked for its computes. */
export interface IBackend {
  name: string;
  available: boolean;
  message: string;
}

/** The body of `GET /kt/api/computes`. */
export interface IComputeList {
  computes: ICompute[];
  backends: IBackend[];
}

/** The fields of a Compute spec the sidebar's form sets. */
export interface IComputeSpec {
  name: string;
  backend: string;
  cpus?: string;
  memory?: string;
  gpus?: string;
}

/** Call `/kt/api/<path>`; a non-2xx reply rejects with the server's message. */
export async function requestAPI<T>(path: string, init: RequestInit = {}): Promise<T> {
  const settings = ServerConnection.makeSettings();
  const url = URLExt.join(settings.baseUrl, 'kt', 'api', path);
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, init, settings);
  } catch (error) {
    throw new ServerConnection.NetworkError(error as TypeError);
  }
  const text = await response.text();
  let data: any = {};
  try {
    data = text ? JSON.parse(text) : {};
  } catch {
    data = { message: text };
  }
  if (!response.ok) {
    throw new Error(data.message || `${response.status} ${response.statusText}`);
  }
  return data as T;
}

function computePath(c: { backend: string; name: string }, ...rest: string[]): string {
  return ['computes', encodeURIComponent(c.backend), encodeURIComponent(c.name), ...rest].join('/');
}

/** A listing that takes longer than this is abandoned (the next poll asks again). */
const LIST_TIMEOUT_MS = 15000;

/** Every compute of every backend. */
export function listComputes(): Promise<IComputeList> {
  return requestAPI<IComputeList>('computes', { signal: AbortSignal.timeout(LIST_TIMEOUT_MS) });
}

/** The last `tail` lines of a compute's log. */
export async function computeLogs(c: ICompute, tail = 500): Promise<string> {
  const reply = await requestAPI<{ logs: string }>(`${computePath(c, 'logs')}?tail=${tail}`);
  return reply.logs;
}

/** Stop a compute (its kernel and its variables are gone afterwards). */
export function stopCompute(c: ICompute): Promise<unknown> {
  return requestAPI(computePath(c), { method: 'DELETE' });
}

/** Launch a compute from a spec; resolves when it is ready. */
export function launchCompute(spec: IComputeSpec): Promise<ICompute> {
  return requestAPI<ICompute>('computes', { method: 'POST', body: JSON.stringify(spec) });
}
