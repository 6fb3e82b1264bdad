//! Files written as one set: either every file of the set is replaced by its new content, or
//! none is (the files that were there keep their old content) and no temporary is left behind.
//!
//! [`write_set`] writes every file to a temporary sibling (`.NAME.tmp-PID-N`, flushed to disk),
//! keeps a backup of each file it will replace (`.NAME.old-PID-N`, a hard link, or a copy where
//! the file system has none), then renames the temporaries into place one by one. If any step
//! fails, the files already renamed are put back from their backups (or removed, where there was
//! no file before) and every temporary and backup is removed. A destination that exists but is
//! not a regular file (a directory named `loss.csv`, say) is refused before anything is written.
//!
//! Used for `elra fit`'s `loss.csv` + `loss.svg` and for each App. G setting's
//! `mse_vs_rank.csv` + `mse_vs_rank.svg`.

use elra::{ElraError, Result};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

fn io_err(path: &Path, e: impl std::fmt::Display) -> ElraError {
    ElraError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// A sibling of `dir/name` that no other call of this process uses: `.{name}.{kind}-{pid}-{n}`.
fn sibling(dir: &Path, name: &str, kind: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(".{name}.{kind}-{}-{n}", std::process::id()))
}

/// Checks, writing nothing, that [`write_set`] can put files called `names` into `dir`: the first
/// existing path among `dir` and its ancestors is a directory (so `dir` exists or can be
/// created), and no `dir/NAME` exists that is not a regular file. Commands call it before a long
/// run, so that an output blocked by, say, a directory called `loss.csv` is reported before the
/// work, not after it.
///
/// Errors: [`ElraError::Io`] naming the path in the way.
pub fn check_set(dir: &Path, names: &[&str]) -> Result<()> {
    for p in dir.ancestors().filter(|p| !p.as_os_str().is_empty()) {
        match fs::metadata(p) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => return Err(io_err(p, "is not a directory; nothing was written")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(p, e)),
        }
    }
    for name in names {
        let d = dir.join(name);
        match fs::symlink_metadata(&d) {
            Ok(m) if !m.is_file() => {
                return Err(io_err(
                    &d,
                    "exists and is not a regular file; nothing was written",
                ))
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&d, e)),
        }
    }
    Ok(())
}

/// Writes `files` (`(file name, contents)`) into `dir` (created if missing) as one set (module
/// docs). Returns the paths written, in the order given.
///
/// Errors: [`ElraError::InvalidArgument`] for a file name that is empty, has a path separator or
/// is `.`/`..`, or appears twice; [`ElraError::Io`] naming the path when `dir` cannot be created,
/// a destination exists and is not a regular file ([`check_set`]), or a write, backup or rename
/// fails — then no file of the set was changed.
pub fn write_set(dir: &Path, files: &[(&str, &[u8])]) -> Result<Vec<PathBuf>> {
    write_set_with(dir, files, &mut |from, to| fs::rename(from, to))
}

/// [`write_set`] with the rename of each temporary into place done by `rename` (a test injects
/// failures here; restoring backups always uses [`fs::rename`]).
#[doc(hidden)]
pub fn write_set_with(
    dir: &Path,
    files: &[(&str, &[u8])],
    rename: &mut dyn FnMut(&Path, &Path) -> std::io::Result<()>,
) -> Result<Vec<PathBuf>> {
    for (i, (name, _)) in files.iter().enumerate() {
        if name.is_empty() || *name == "." || *name == ".." || name.contains(['/', '\\']) {
            return Err(ElraError::invalid(
                "files",
                format!("{name:?} is not a plain file name"),
            ));
        }
        if files[..i].iter().any(|(n, _)| n == name) {
            return Err(ElraError::invalid("files", format!("{name:?} given twice")));
        }
    }
    check_set(dir, &files.iter().map(|(n, _)| *n).collect::<Vec<_>>())?;
    fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let dests: Vec<PathBuf> = files.iter().map(|(n, _)| dir.join(n)).collect();
    let mut set = Staged::default();
    let result = set.commit(dir, files, &dests, rename);
    set.clean();
    result.map(|()| dests)
}

/// What [`write_set_with`] has done so far, for the rollback.
#[derive(Default)]
struct Staged {
    /// Temporaries not yet renamed into place.
    temps: Vec<PathBuf>,
    /// Backups of replaced files, `(backup, destination)`.
    backups: Vec<(PathBuf, PathBuf)>,
    /// Destinations already holding their new content, with their backup if there was an old
    /// file (`None`: the destination did not exist).
    done: Vec<(PathBuf, Option<PathBuf>)>,
}

impl Staged {
    fn commit(
        &mut self,
        dir: &Path,
        files: &[(&str, &[u8])],
        dests: &[PathBuf],
        rename: &mut dyn FnMut(&Path, &Path) -> std::io::Result<()>,
    ) -> Result<()> {
        let mut temps = Vec::with_capacity(files.len());
        for (name, bytes) in files {
            let tmp = sibling(dir, name, "tmp");
            self.temps.push(tmp.clone());
            fs::File::create(&tmp)
                .and_then(|mut f| {
                    f.write_all(bytes)?;
                    f.sync_all()
                })
                .map_err(|e| io_err(&tmp, e))?;
            temps.push(tmp);
        }
        let mut olds = Vec::with_capacity(files.len());
        for ((name, _), dest) in files.iter().zip(dests) {
            if !dest.exists() {
                olds.push(None);
                continue;
            }
            let old = sibling(dir, name, "old");
            if fs::hard_link(dest, &old).is_err() {
                fs::copy(dest, &old).map_err(|e| io_err(dest, e))?;
            }
            self.backups.push((old.clone(), dest.clone()));
            olds.push(Some(old));
        }
        for ((tmp, dest), old) in temps.iter().zip(dests).zip(olds) {
            match rename(tmp, dest) {
                Ok(()) => {
                    self.temps.retain(|t| t != tmp);
                    self.done.push((dest.clone(), old));
                }
                Err(e) => {
                    let err = io_err(dest, e);
                    return Err(match self.roll_back() {
                        Ok(()) => err,
                        Err(e2) => ElraError::Io {
                            path: dest.display().to_string(),
                            reason: format!("{err}; restoring the earlier files failed too: {e2}"),
                        },
                    });
                }
            }
        }
        // Committed: the backups are no longer needed (removed by `clean`).
        self.done.clear();
        Ok(())
    }

    /// Puts back the old content of every destination already replaced (or removes it where
    /// there was none), last first.
    fn roll_back(&mut self) -> Result<()> {
        let mut first_err = None;
        while let Some((dest, old)) = self.done.pop() {
            let r = match old {
                Some(old) => fs::rename(&old, &dest).map(|()| {
                    self.backups.retain(|(b, _)| *b != old);
                }),
                None => fs::remove_file(&dest),
            };
            if let Err(e) = r {
                first_err.get_or_insert(io_err(&dest, e));
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Removes every temporary and backup still there.
    fn clean(&mut self) {
        for t in self.temps.drain(..) {
            let _ = fs::remove_file(t);
        }
        for (b, _) in self.backups.drain(..) {
            let _ = fs::remove_file(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("elra-lab-output-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn listing(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<(String, Vec<u8>)> = fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let name = e.file_name().into_string().unwrap();
                let bytes = if e.path().is_file() {
                    fs::read(e.path()).unwrap()
                } else {
                    b"<dir>".to_vec()
                };
                (name, bytes)
            })
            .collect();
        v.sort();
        v
    }

    /// Every rename failing in turn (1st, 2nd, 3rd of a set of three), with and without old
    /// files in place: an error naming the file, the directory exactly as it was (old contents
    /// or nothing), no temporaries or backups left. Without failures the set is replaced.
    #[test]
    fn each_failing_rename_leaves_the_old_set_and_no_temporaries() {
        let names = ["a.csv", "b.svg", "c.txt"];
        for with_old in [false, true] {
            for fail_at in 0..names.len() {
                let dir = scratch(&format!("fail{fail_at}-{with_old}"));
                fs::create_dir_all(&dir).unwrap();
                if with_old {
                    for n in names {
                        fs::write(dir.join(n), format!("old {n}")).unwrap();
                    }
                }
                let before = listing(&dir);
                let files: Vec<(&str, &[u8])> =
                    names.iter().map(|n| (*n, b"new".as_slice())).collect();
                let mut calls = 0;
                let err = write_set_with(&dir, &files, &mut |from, to| {
                    calls += 1;
                    if calls == fail_at + 1 {
                        Err(std::io::Error::other("injected"))
                    } else {
                        fs::rename(from, to)
                    }
                })
                .unwrap_err();
                assert!(
                    matches!(&err, ElraError::Io { path, reason }
                        if path.ends_with(names[fail_at]) && reason.contains("injected")),
                    "{err:?}"
                );
                assert_eq!(
                    listing(&dir),
                    before,
                    "fail at {fail_at}, old files {with_old}"
                );
                let _ = fs::remove_dir_all(&dir);
            }
        }
        let dir = scratch("ok");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("a.csv"), "old").unwrap();
        let written = write_set(&dir, &[("a.csv", b"1"), ("b.svg", b"2")]).unwrap();
        assert_eq!(written, [dir.join("a.csv"), dir.join("b.svg")]);
        assert_eq!(
            listing(&dir),
            [
                ("a.csv".into(), b"1".to_vec()),
                ("b.svg".into(), b"2".to_vec())
            ]
        );
        let _ = fs::remove_dir_all(&dir);
    }

    /// A directory where a file of the set goes (either one): refused before anything is
    /// written, the other file keeps its old content; bad names are refused too.
    #[test]
    fn a_directory_in_the_way_is_refused_before_writing() {
        for blocked in ["loss.csv", "loss.svg"] {
            let dir = scratch(&format!("blocked-{blocked}"));
            fs::create_dir_all(dir.join(blocked)).unwrap();
            for n in ["loss.csv", "loss.svg"] {
                if n != blocked {
                    fs::write(dir.join(n), "old").unwrap();
                }
            }
            let before = listing(&dir);
            let err = write_set(&dir, &[("loss.csv", b"new"), ("loss.svg", b"new")]).unwrap_err();
            assert!(err.to_string().contains(blocked), "{err}");
            assert_eq!(listing(&dir), before);
            let _ = fs::remove_dir_all(&dir);
        }
        let dir = scratch("names");
        for bad in ["", ".", "..", "a/b"] {
            assert!(write_set(&dir, &[(bad, b"x")]).is_err(), "{bad:?}");
        }
        assert!(write_set(&dir, &[("a", b"x"), ("a", b"y")]).is_err());
        assert!(!dir.exists());
    }
}
