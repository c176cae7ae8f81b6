//! Opt-in stage timing for accelerators: with `GRATING_STAGE_PROFILE=1` the model code marks
//! the end of each stage of a layer, the device is synchronised at each mark, and the time
//! per stage is summed and printed to stderr when the process exits. Kernels run
//! asynchronously, so without the synchronisation nothing per stage could be measured; with
//! it the totals are slower than a normal run and only their shares are meaningful.

use candle_core::Tensor;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

struct Table {
    last: Option<Instant>,
    totals: Vec<(&'static str, f64, u64)>,
}

fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("GRATING_STAGE_PROFILE").is_ok_and(|v| v == "1"))
}

fn table() -> &'static Mutex<Table> {
    static T: OnceLock<Mutex<Table>> = OnceLock::new();
    T.get_or_init(|| {
        extern "C" fn report() {
            print_report();
        }
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
