//! Replacing a set of files as one: either every file holds its new contents or every file is
//! as it was, with no temporary file left behind ([`write_files_atomically`]).
//!
//! The protocol, for files `f_1 … f_n` in one or more directories:
//! 1. write each new content to a temporary file beside its target (`.name.tmp-PID-N`) and
//!    `fsync` it; a failure removes the temporaries written so far, nothing else changed;
//! 2. keep each existing target as a hard link `.name.bak-PID-N` (the target itself stays in
//!    place, so readers never see it missing; a copy where the file system has no hard links);
//!    a target that exists but is not a regular file is refused; a failure removes the backups
//!    and the temporaries;
//! 3. rename each temporary over its target (each rename is atomic); a failure at file `i`
//!    renames the backups of `f_1 … f_{i−1}` back over them (or removes them where there was no
//!    previous file) and removes every temporary and link;
//! 4. remove the links and `fsync` the directories (best effort).
//!
//! So the set is replaced as a whole unless the file system fails while undoing step 3 (then the
//! error says so and names the files). [`check_files`] makes the same refusals without writing,
//! for commands that check their outputs before long work; [`write_files_in`] writes named files
//! into a directory.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{ElraError, Result};

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn io_err(path: &Path, e: std::io::Error) -> ElraError {
    ElraError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."))
}

/// A fresh hidden name beside `path`: `.name.<kind>-PID-N`.
fn sibling(path: &Path, kind: &str) -> Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| io_err(path, std::io::Error::other("not a file path")))?;
    Ok(parent_dir(path).join(format!(
        ".{}.{kind}-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )))
}

/// Writes `bytes` to a new temporary file beside `path` and `fsync`s it. On error nothing is
/// left behind.
fn write_temp(path: &Path, bytes: &[u8]) -> Result<PathBuf> {
    let tmp = sibling(path, "tmp")?;
    let res = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    match res {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(io_err(path, e))
        }
    }
}

/// The file-system operations of the protocol, replaceable in tests to make each step fail.
pub(crate) trait Fs {
    /// `std::fs::hard_link(from, to)`, or a copy where hard links are not supported.
    fn link(&mut self, from: &Path, to: &Path) -> std::io::Result<()>;
    /// `std::fs::rename(from, to)`.
    fn rename(&mut self, from: &Path, to: &Path) -> std::io::Result<()>;
}

/// The real file system.
struct RealFs;

impl Fs for RealFs {
    fn link(&mut self, from: &Path, to: &Path) -> std::io::Result<()> {
        std::fs::hard_link(from, to).or_else(|_| std::fs::copy(from, to).map(drop))
    }
    fn rename(&mut self, from: &Path, to: &Path) -> std::io::Result<()> {
        std::fs::rename(from, to)
    }
}

fn not_a_file(path: &Path) -> ElraError {
    io_err(
        path,
        std::io::Error::other("exists and is not a regular file; nothing was written"),
    )
}

/// Checks, writing nothing, that [`write_files_in`] can write files called `names` into `dir`:
/// the first existing path among `dir` and its ancestors is a directory (so `dir` exists or can
/// be created), and no `dir/NAME` exists that is not a regular file. Commands call it before a
/// long run, so that an output blocked by, say, a directory called `loss.csv` is reported before
/// the work.
///
/// Errors: [`ElraError::Io`] naming the path in the way.
pub fn check_files(dir: &Path, names: &[&str]) -> Result<()> {
    for p in dir.ancestors().filter(|p| !p.as_os_str().is_empty()) {
        match std::fs::metadata(p) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => {
                return Err(io_err(
                    p,
                    std::io::Error::other("is not a directory; nothing was written"),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(p, e)),
        }
    }
    for name in names {
        let d = dir.join(name);
        match std::fs::symlink_metadata(&d) {
            Ok(m) if !m.is_file() => return Err(not_a_file(&d)),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&d, e)),
        }
    }
    Ok(())
}

/// Writes `files` (`(file name, contents)`) into `dir` (created if missing) as one set
/// ([`write_files_atomically`]) and returns their paths in the order given.
///
/// Errors: [`ElraError::InvalidArgument`] for a name that is empty, `.`/`..`, holds a path
/// separator or appears twice; [`ElraError::Io`] as [`check_files`] and
/// [`write_files_atomically`] — then no file was changed.
pub fn write_files_in(dir: &Path, files: &[(&str, &[u8])]) -> Result<Vec<PathBuf>> {
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
    check_files(dir, &files.iter().map(|(n, _)| *n).collect::<Vec<_>>())?;
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let paths: Vec<PathBuf> = files.iter().map(|(n, _)| dir.join(n)).collect();
    let set: Vec<(&Path, &[u8])> = paths
        .iter()
        .zip(files)
        .map(|(p, (_, b))| (p.as_path(), *b))
        .collect();
    write_files_atomically(&set)?;
    Ok(paths)
}

/// Replaces each `path` by its `bytes`, all or nothing (module docs). Paths must be distinct
/// files; their directories must exist.
///
/// Errors: [`ElraError::Io`] naming the file whose write, link or rename failed (the previous
/// contents of every file are then in place and no temporary file remains).
pub fn write_files_atomically(files: &[(&Path, &[u8])]) -> Result<()> {
    write_with(files, &mut RealFs)
}

/// [`write_files_atomically`] on the operations of `fs`.
pub(crate) fn write_with(files: &[(&Path, &[u8])], fs: &mut dyn Fs) -> Result<()> {
    // 1. temporaries
    let mut temps: Vec<PathBuf> = Vec::with_capacity(files.len());
    let cleanup = |paths: &[PathBuf]| {
        for p in paths {
            let _ = std::fs::remove_file(p);
        }
    };
    for (path, bytes) in files {
        match write_temp(path, bytes) {
            Ok(t) => temps.push(t),
            Err(e) => {
                cleanup(&temps);
                return Err(e);
            }
        }
    }
    // 2. backups of the existing targets (hard links; the targets stay in place)
    let mut backups: Vec<Option<PathBuf>> = Vec::with_capacity(files.len());
    for (path, _) in files {
        let step = (|| -> Result<Option<PathBuf>> {
            match std::fs::symlink_metadata(path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(io_err(path, e)),
                Ok(m) if !m.is_file() => Err(not_a_file(path)),
                Ok(_) => {
                    let bak = sibling(path, "bak")?;
                    fs.link(path, &bak).map_err(|e| io_err(path, e))?;
                    Ok(Some(bak))
                }
            }
        })();
        match step {
            Ok(b) => backups.push(b),
            Err(e) => {
                cleanup(&temps);
                cleanup(&backups.iter().flatten().cloned().collect::<Vec<_>>());
                return Err(e);
            }
        }
    }
    // 3. install
    for (i, ((path, _), tmp)) in files.iter().zip(&temps).enumerate() {
        if let Err(e) = fs.rename(tmp, path) {
            let mut err = io_err(path, e);
            // Undo the files already replaced, newest first.
            for j in (0..i).rev() {
                let target = files[j].0;
                let undo = match &backups[j] {
                    Some(bak) => fs.rename(bak, target),
                    None => std::fs::remove_file(target),
                };
                if let Err(u) = undo {
                    err = ElraError::Io {
                        path: target.display().to_string(),
                        reason: format!(
                            "{err}; restoring the previous file then failed too ({u}): the set \
                             is mixed"
                        ),
                    };
                }
            }
            cleanup(&temps[i..]);
            cleanup(&backups.iter().flatten().cloned().collect::<Vec<_>>());
            return Err(err);
        }
    }
    // 4. drop the backups, persist the renames
    cleanup(&backups.iter().flatten().cloned().collect::<Vec<_>>());
    for (path, _) in files {
        if let Ok(d) = std::fs::File::open(parent_dir(path)) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails the `fail_at`-th link or rename (counting both), else does what the file system does.
    struct Faulty {
        calls: usize,
        fail_at: usize,
    }

    impl Faulty {
        fn step(&mut self) -> std::io::Result<()> {
            self.calls += 1;
            if self.calls == self.fail_at {
                Err(std::io::Error::other("injected failure"))
            } else {
                Ok(())
            }
        }
    }

    impl Fs for Faulty {
        fn link(&mut self, from: &Path, to: &Path) -> std::io::Result<()> {
            self.step()?;
            std::fs::hard_link(from, to)
        }
        fn rename(&mut self, from: &Path, to: &Path) -> std::io::Result<()> {
            self.step()?;
            std::fs::rename(from, to)
        }
    }

    /// Every file of `dir` with its contents, sorted.
    fn listing(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let content = std::fs::read(e.path()).unwrap_or_default();
                (e.file_name().to_string_lossy().into_owned(), content)
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn every_failing_step_leaves_the_previous_set_and_no_temporary() {
        let dir = std::env::temp_dir().join(format!("elra-atomic-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b, c) = (dir.join("a.bin"), dir.join("b.json"), dir.join("c.csv"));
        // `a` and `b` exist, `c` is new.
        std::fs::write(&a, b"old a").unwrap();
        std::fs::write(&b, b"old b").unwrap();
        let before = listing(&dir);
        let files: [(&Path, &[u8]); 3] = [(&a, b"new a"), (&b, b"new b"), (&c, b"new c")];
        // 2 links + 3 renames: fail each in turn.
        for fail_at in 1..=5 {
            let mut fs = Faulty { calls: 0, fail_at };
            let r = write_with(&files, &mut fs);
            assert!(
                matches!(r, Err(ElraError::Io { ref reason, .. }) if reason.contains("injected")),
                "step {fail_at}: {r:?}"
            );
            assert_eq!(listing(&dir), before, "step {fail_at}");
        }
        // No failure: the new set, nothing else.
        let mut fs = Faulty {
            calls: 0,
            fail_at: 0,
        };
        write_with(&files, &mut fs).unwrap();
        assert_eq!(fs.calls, 5);
        let want: Vec<(String, Vec<u8>)> =
            [("a.bin", "new a"), ("b.json", "new b"), ("c.csv", "new c")]
                .iter()
                .map(|(n, c)| (n.to_string(), c.as_bytes().to_vec()))
                .collect();
        assert_eq!(listing(&dir), want);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn named_files_in_a_directory() {
        let dir = std::env::temp_dir().join(format!("elra-atomic-in-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let sub = dir.join("new");
        let paths = write_files_in(&sub, &[("a.csv", b"1"), ("b.svg", b"2")]).unwrap();
        assert_eq!(paths, [sub.join("a.csv"), sub.join("b.svg")]);
        assert_eq!(std::fs::read(&paths[1]).unwrap(), b"2");
        for bad in ["", ".", "..", "x/y"] {
            assert!(write_files_in(&sub, &[(bad, b"x")]).is_err(), "{bad:?}");
        }
        assert!(write_files_in(&sub, &[("a", b"x"), ("a", b"y")]).is_err());
        std::fs::create_dir(sub.join("c.csv")).unwrap();
        assert!(check_files(&sub, &["c.csv"]).is_err());
        std::fs::write(dir.join("file"), b"").unwrap();
        assert!(check_files(&dir.join("file").join("x"), &["a"]).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_directory_in_the_way_changes_nothing() {
        let dir = std::env::temp_dir().join(format!("elra-atomic-dir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("b.json")).unwrap();
        let a = dir.join("a.bin");
        std::fs::write(&a, b"old a").unwrap();
        let before = listing(&dir);
        let b = dir.join("b.json");
        let r = write_files_atomically(&[(&a, b"new a"), (&b, b"new b")]);
        assert!(matches!(r, Err(ElraError::Io { .. })), "{r:?}");
        assert_eq!(listing(&dir), before);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
