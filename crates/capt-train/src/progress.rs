//! What a user waiting on a run sees: `indicatif` bars (hidden under `--no-progress` or when
//! stderr is not a terminal) and each run folder's `log.txt`, a copy of every log line the run
//! printed.
//!
//! `log.txt` works through a tracing writer ([`RunLog`]) that main installs next to the
//! terminal's. A command attaches its run folder with [`attach`]; nested runs (a `b2n` cell's
//! `fit` inside the `b2n` folder) attach theirs too, and a line goes to every attached folder,
//! so the outer log holds everything and each inner one its own part.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::error::{Result, TrainError};

static ENABLED: AtomicBool = AtomicBool::new(true);

fn multi() -> &'static MultiProgress {
    static MULTI: OnceLock<MultiProgress> = OnceLock::new();
    MULTI.get_or_init(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()))
}

/// The tracing writer for the terminal: each line is written with the bars lifted, so log
/// lines and bars do not overwrite each other.
#[derive(Default)]
pub struct Stderr {
    buf: Vec<u8>,
}

impl Write for Stderr {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            let buf = std::mem::take(&mut self.buf);
            multi().suspend(|| std::io::stderr().write_all(&buf))?;
        }
        Ok(())
    }
}

impl Drop for Stderr {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

/// Makes [`Stderr`] writers (one per event).
#[derive(Clone, Copy, Default)]
pub struct MakeStderr;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for MakeStderr {
    type Writer = Stderr;

    fn make_writer(&'a self) -> Self::Writer {
        Stderr::default()
    }
}

/// Turns every bar of this process off (`--no-progress`).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// A progress bar of `len` steps, labelled `prefix`; hidden when `show` is false, bars are
/// off ([`set_enabled`]) or stderr is not a terminal (logs redirected to a file get no bar
/// escapes).
pub fn bar(show: bool, len: usize, prefix: impl Into<String>) -> ProgressBar {
    if !show
        || !ENABLED.load(Ordering::Relaxed)
        || !std::io::IsTerminal::is_terminal(&std::io::stderr())
    {
        return ProgressBar::hidden();
    }
    // One MultiProgress for the process: a b2n bar and its cell's epoch bar draw together.
    let bar = multi().add(ProgressBar::new(len as u64));
    let style = ProgressStyle::with_template(
        "{prefix} [{bar:30}] {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
    )
    .expect("valid template")
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(prefix.into());
    bar
}

/// The name of the per-run copy of the log.
pub const LOG_TXT: &str = "log.txt";

struct Attached {
    dir: PathBuf,
    file: File,
}

fn attached() -> &'static Mutex<Vec<Attached>> {
    static FILES: OnceLock<Mutex<Vec<Attached>>> = OnceLock::new();
    FILES.get_or_init(|| Mutex::new(Vec::new()))
}

/// Keeps a run folder's `log.txt` attached until dropped.
#[must_use = "the log is detached when the guard drops"]
pub struct LogGuard {
    dir: PathBuf,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        let mut files = attached().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = files.iter().rposition(|a| a.dir == self.dir) {
            files.remove(i);
        }
    }
}

/// Appends every following log line to `<dir>/log.txt` (created with `dir`; a resumed run
/// appends) until the guard drops.
pub fn attach(dir: &Path) -> Result<LogGuard> {
    std::fs::create_dir_all(dir).map_err(|e| TrainError::io("create run folder", dir, e))?;
    let path = dir.join(LOG_TXT);
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| TrainError::io("open", &path, e))?;
    let _ = OUTERMOST.set(dir.to_path_buf());
    attached()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Attached {
            dir: dir.to_path_buf(),
            file,
        });
    Ok(LogGuard {
        dir: dir.to_path_buf(),
    })
}

/// Writes `line` (plus a newline) to every attached `log.txt`: for what a command prints
/// outside tracing (its final error, a table on stdout).
pub fn record(line: &str) {
    let mut files = attached().lock().unwrap_or_else(|e| e.into_inner());
    for a in files.iter_mut() {
        // A full disk must not stop training over a log copy; the terminal still has it.
        let _ = writeln!(a.file, "{line}");
    }
}

/// The first (outermost) run folder this process attached, kept after its guard dropped so
/// that main can append the command's final error there.
pub fn last_dir() -> Option<PathBuf> {
    OUTERMOST.get().cloned()
}

/// The folder an error of this command belongs to: the first one attached (set once).
static OUTERMOST: OnceLock<PathBuf> = OnceLock::new();

/// Appends `line` to `<dir>/log.txt` directly (no guard needed).
pub fn append_line(dir: &Path, line: &str) {
    if let Ok(mut f) = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(LOG_TXT))
    {
        let _ = writeln!(f, "{line}");
    }
}

/// The tracing writer behind `log.txt`: each formatted event goes to every attached file.
#[derive(Clone, Default)]
pub struct RunLog {
    buf: Arc<Mutex<Vec<u8>>>,
}

impl Write for RunLog {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let mut buf = self.buf.lock().unwrap_or_else(|e| e.into_inner());
        buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let mut buf = self.buf.lock().unwrap_or_else(|e| e.into_inner());
        if buf.is_empty() {
            return Ok(());
        }
        let mut files = attached().lock().unwrap_or_else(|e| e.into_inner());
        for a in files.iter_mut() {
            let _ = a.file.write_all(&buf);
        }
        buf.clear();
        Ok(())
    }
}

impl Drop for RunLog {
    fn drop(&mut self) {
        // tracing-subscriber makes a writer per event and drops it after the event is written.
        let _ = self.flush();
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for RunLog {
    type Writer = RunLog;

    fn make_writer(&'a self) -> Self::Writer {
        RunLog::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn lines_go_to_every_attached_folder_until_detached() {
        let dir = tempfile::tempdir().unwrap();
        let (outer, inner) = (dir.path().join("b2n"), dir.path().join("b2n/cell"));
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(RunLog::default()),
        );
        tracing::subscriber::with_default(subscriber, || {
            let _o = attach(&outer).unwrap();
            tracing::info!("before the cell");
            {
                let _i = attach(&inner).unwrap();
                tracing::info!(epoch = 1, "inside the cell");
                record("a printed line");
            }
            tracing::info!("after the cell");
        });
        tracing::info!("nothing attached: no file gets this");
        let read = |p: &Path| std::fs::read_to_string(p.join(LOG_TXT)).unwrap();
        let (o, i) = (read(&outer), read(&inner));
        for want in [
            "before the cell",
            "inside the cell epoch=1",
            "a printed line",
            "after the cell",
        ] {
            assert!(o.contains(want), "outer log lacks {want:?}: {o}");
        }
        assert!(
            i.contains("inside the cell") && i.contains("a printed line"),
            "{i}"
        );
        assert!(
            !i.contains("before the cell") && !i.contains("after the cell"),
            "{i}"
        );
        assert!(!o.contains("nothing attached"));
    }
}
