/**
 * The OS lock a server holds on a lock file in its data directory, so that a
 * second server on the same files refuses to start. (A lock on a data file
 * itself would stop protecting it once the file is replaced by a rename.)
 *
 * @module
 */

/**
 * Opens (creating, mode 0600) and locks `path` without waiting. Resolves to
 * the open file, whose `close()` releases the lock, or to `null` when another
 * process holds it.
 */
export async function tryLockFile(path: string): Promise<Deno.FsFile | null> {
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
  return null;
}
