import { readFileSync } from 'node:fs';

// A local PostgreSQL seen from outside the process that started it: tests that stop that process
// check whether its server went with it.

/** The postmaster's pid from a data dir's postmaster.pid, once the server has written it. */
export function postmasterPid(pidFile: string): number | null {
  try {
    const pid = Number(readFileSync(pidFile, 'utf8').split('\n')[0]);
    return pid > 0 ? pid : null;
  } catch {
    return null;
  }
}

/** Whether `pid` runs; a zombie nobody has reaped yet (an orphan's, in a container) does not. */
export function running(pid: number): boolean {
  try {
    return !/^\d+ \(.*\) Z/.test(readFileSync(`/proc/${pid}/stat`, 'utf8'));
  } catch {
    return false;
  }
}
