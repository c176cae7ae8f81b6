//! Opt-in stage timing for accelerators: once [`set_stage_profile`] turns it on, the model code
//! marks the end of each stage of a layer, the device is synchronised at each mark, and the
//! time per stage is summed and printed to stderr when the process exits. Kernels run
//! asynchronously, so without the synchronisation nothing per stage could be measured; with
//! it the totals are slower than a normal run and only their shares are meaningful.

use candle_core::Tensor;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

struct Table {
    last: Option<Instant>,
    totals: Vec<(&'static str, f64, u64)>,
}

/// Off by default: the synchronisation at every mark slows a run down.
static ON: AtomicBool = AtomicBool::new(false);

/// Turns stage timing on or off for the whole process. Process-wide because the table it fills
/// is (one report at exit, summed over every model and thread), and because the marks sit in
/// the model code, far from any per-request setting; every mark reads it, hence an atomic.
pub fn set_stage_profile(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

fn table() -> &'static Mutex<Table> {
    static T: OnceLock<Mutex<Table>> = OnceLock::new();
    T.get_or_init(|| {
        extern "C" fn report() {
            print_report();
        }
        // SAFETY: `report` is an `extern "C" fn()` with no arguments, as atexit expects, and
        // stays valid for the whole process (a plain function); it only locks the table and
        // writes to stderr, and a panic in it aborts rather than unwinding into C.
        unsafe { libc::atexit(report) };
        Mutex::new(Table {
            last: None,
            totals: Vec::new(),
        })
    })
}

/// Starts timing a layer (the time since the previous mark is not attributed).
pub fn begin(t: &Tensor) {
    if enabled() {
        let _ = t.device().synchronize();
        table().lock().unwrap_or_else(|p| p.into_inner()).last = Some(Instant::now());
    }
}

/// Ends stage `name`: everything queued since the previous mark is charged to it.
pub fn mark(name: &'static str, t: &Tensor) {
    if !enabled() {
        return;
    }
    let _ = t.device().synchronize();
    let now = Instant::now();
    let mut tb = table().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(last) = tb.last {
        let dt = (now - last).as_secs_f64();
        match tb.totals.iter_mut().find(|(n, _, _)| *n == name) {
            Some(e) => {
                e.1 += dt;
                e.2 += 1;
            }
            None => tb.totals.push((name, dt, 1)),
        }
    }
    tb.last = Some(now);
}

fn print_report() {
    let tb = table().lock().unwrap_or_else(|p| p.into_inner());
    let total: f64 = tb.totals.iter().map(|e| e.1).sum();
    if total == 0.0 {
        return;
    }
    eprintln!("stage profile (synchronised; shares only):");
    for (name, secs, n) in &tb.totals {
        eprintln!(
            "  {name:<12} {:>9.2} ms {:>5.1}%  ({n} calls)",
            secs * 1e3,
            100.0 * secs / total
        );
    }
}
