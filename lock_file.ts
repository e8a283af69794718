/**
 * The OS lock a server holds on a lock file in its data directory, so that a
 * second server on the same files refuses to start. (A lock on a data file
 * itself would stop protecting it once the file is replaced by a rename.)
 *
 * @module
 */

/**
 * How long a lock held by someone else is waited for before giving up, in
 * waits that double. A lock belongs to the open file, which a process being
 * started by another thread of the same process shares until it runs its
 * program (the runtime closes it then): a lock released a moment ago can
 * still look held for that long.
 */
const LOCK_WAITS_MS = [5, 10, 20, 40, 80, 160];

/**
 * Opens (creating, mode 0600) and locks `path`, waiting at most about 0.3 s
 * for a holder that is letting go. Resolves to the open file, whose
 * `close()` releases the lock, or to `null` when another process holds it.
 */
export async function tryLockFile(path: string): Promise<Deno.FsFile | null> {
  for (let attempt = 0;; attempt++) {
    const file = await Deno.open(path, {
      read: true,
      write: true,
      create: true,
      mode: 0o600,
    });
    try {
      if (await file.tryLock(true)) return file;
    } catch (err) {
      file.close();
      throw err;
    }
    file.close();
    const wait = LOCK_WAITS_MS[attempt];
    if (wait === undefined) return null;
    await new Promise((resolve) => setTimeout(resolve, wait));
  }
}
