/**
 * Short human forms of phases, activity, sizes and durations for the sidebar: the words of
 * `%kt list`, `%kt status`, the status panel and the picker (kt_jupyter/widgets/models.py).
 */

/** The phases of a compute, as every view writes them. */
export const PHASES = ['launching', 'ready', 'stopped', 'failed'];

/** Other words for a phase and the phase they mean (as `phase_word` in models.py). */
const PHASE_ALIASES: Record<string, string> = {
  pending: 'launching',
  starting: 'launching',
  pulling: 'launching',
  running: 'ready',
  idle: 'ready',
  error: 'failed',
  deleted: 'stopped'
};

/** The word shown for a backend's phase (unknown words read `failed`). */
export function phaseWord(phase: string): string {
  const p = (phase || '').trim().toLowerCase();
  const word = PHASE_ALIASES[p] ?? p;
  return PHASES.includes(word) ? word : 'failed';
}

/** What a ready kernel does: `running a cell`, `idle 3m 20s`, or '' when not known. */
export function activityText(running: boolean, idleS: number | null | undefined): string {
  if (running) {
    return 'running a cell';
  }
  return idleS === null || idleS === undefined ? '' : `idle ${formatDuration(idleS)}`;
}

/** `1536` -> `1.5 KiB`. */
export function formatBytes(n: number | null | undefined): string {
  if (n === null || n === undefined) {
    return '?';
  }
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = n;
  let i = 0;
  while (value >= 1024 && i < units.length - 1) {
    value /= 1024;
    i++;
  }
  return `${value < 10 && i > 0 ? value.toFixed(1) : Math.round(value)} ${units[i]}`;
}

/** `75` -> `1m 15s`, `4000` -> `1h 6m`. */
export function formatDuration(seconds: number | null | undefined): string {
  if (seconds === null || seconds === undefined) {
    return '?';
  }
  const s = Math.max(0, Math.floor(seconds));
  if (s < 60) {
    return `${s}s`;
  }
  if (s < 3600) {
    return `${Math.floor(s / 60)}m ${s % 60}s`;
  }
  if (s < 86400) {
    return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  }
  return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
}

/** `{cpus: '2', memory: '4Gi', gpus: '1'}` -> `2 CPU · 4Gi · 1 GPU`. */
export function formatResources(r: Record<string, string | number>): string {
  const parts: string[] = [];
  if (r.cpus) {
    parts.push(`${r.cpus} CPU`);
  }
  if (r.memory) {
    parts.push(`${r.memory}`);
  }
  if (r.gpus) {
    parts.push(`${r.gpus} GPU${r.gpu_type ? ` ${r.gpu_type}` : ''}`);
  }
  if (r.gpu_memory) {
    parts.push(`${r.gpu_memory} GPU mem`);
  }
  return parts.length ? parts.join(' · ') : 'default resources';
}
