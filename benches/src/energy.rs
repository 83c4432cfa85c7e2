//! The GPU's energy counter, power limit and SM clock through NVML (the
//! driver's `libnvidia-ml.so.1`, opened at run time: nothing to link, and a
//! machine without the driver gets an error naming the library), and the
//! power-cap model the hybrid sweep reads its energies against.
//!
//! Why: on an H200 at its 700 W cap a prefill-heavy step already draws the
//! cap, so running the decode half beside it cannot be free: the two halves'
//! energy has to fit under the cap too. [`cap_bound_s`] turns the energy of
//! each half, measured alone, into the shortest time a perfect overlap could
//! take under the cap.

use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_ulonglong, c_void};

use anyhow::{Context, Result, bail};

type Ret = c_int;
type Handle = *mut c_void;

/// The SM clock (`NVML_CLOCK_SM`).
const CLOCK_SM: c_int = 1;

/// One GPU's NVML handle and the few entry points the benchmarks read.
pub struct Nvml {
    dev: Handle,
    error_string: unsafe extern "C" fn(Ret) -> *const c_char,
    energy: unsafe extern "C" fn(Handle, *mut c_ulonglong) -> Ret,
    power_limit: unsafe extern "C" fn(Handle, *mut c_uint) -> Ret,
    power: unsafe extern "C" fn(Handle, *mut c_uint) -> Ret,
    clock: unsafe extern "C" fn(Handle, c_int, *mut c_uint) -> Ret,
    /// `nvmlDeviceGetCurrentClocksEventReasons` (or its older name,
    /// `...ThrottleReasons`), where the driver has either.
    reasons: Option<unsafe extern "C" fn(Handle, *mut c_ulonglong) -> Ret>,
    /// Keeps the entry points above loaded; last, so dropped last.
    _lib: libloading::Library,
}

impl std::fmt::Debug for Nvml {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nvml")
            .field("dev", &self.dev)
            .finish_non_exhaustive()
    }
}

/// Where NVML looks for a library: the versioned name the driver installs,
/// then the development link.
const LIBRARIES: [&str; 2] = ["libnvidia-ml.so.1", "libnvidia-ml.so"];

impl Nvml {
    /// Opens NVML for the GPU at PCI address `bus_id` (`DDDD:BB:DD.F`, as
    /// [`pci_bus_id`] forms it from the CUDA device's attributes; NVML's
    /// indices need not follow CUDA's).
    pub fn open(bus_id: &str) -> Result<Self> {
        let mut errors = vec![];
        let lib = LIBRARIES
            .iter()
            .find_map(|name| {
                // SAFETY: loading NVML runs only its own initialisers; nothing
                // of it is called before nvmlInit_v2 below.
                match unsafe { libloading::Library::new(*name) } {
                    Ok(l) => Some(l),
                    Err(e) => {
                        errors.push(format!("{name}: {e}"));
                        None
                    }
                }
            })
            .with_context(|| {
                format!(
                    "NVML (the NVIDIA driver's library) not found ({}): energy and clocks need the driver",
                    errors.join("; ")
                )
            })?;
        // SAFETY: the symbols are NVML's documented C entry points with
        // these signatures (nvml.h); the library stays loaded in `_lib`.
        unsafe {
            let init: unsafe extern "C" fn() -> Ret = *lib.get(b"nvmlInit_v2\0").context("nvmlInit_v2")?;
            let by_bus: unsafe extern "C" fn(*const c_char, *mut Handle) -> Ret = *lib
                .get(b"nvmlDeviceGetHandleByPciBusId_v2\0")
                .context("nvmlDeviceGetHandleByPciBusId_v2")?;
            let error_string = *lib.get(b"nvmlErrorString\0").context("nvmlErrorString")?;
            let mut n = Self {
                dev: std::ptr::null_mut(),
                error_string,
                energy: *lib
                    .get(b"nvmlDeviceGetTotalEnergyConsumption\0")
                    .context("nvmlDeviceGetTotalEnergyConsumption")?,
                power_limit: *lib
                    .get(b"nvmlDeviceGetEnforcedPowerLimit\0")
                    .context("nvmlDeviceGetEnforcedPowerLimit")?,
                power: *lib
                    .get(b"nvmlDeviceGetPowerUsage\0")
                    .context("nvmlDeviceGetPowerUsage")?,
                clock: *lib
                    .get(b"nvmlDeviceGetClockInfo\0")
                    .context("nvmlDeviceGetClockInfo")?,
                reasons: [
                    &b"nvmlDeviceGetCurrentClocksEventReasons\0"[..],
                    &b"nvmlDeviceGetCurrentClocksThrottleReasons\0"[..],
                ]
                .into_iter()
                .find_map(|name| lib.get(name).ok().map(|f| *f)),
                _lib: lib,
            };
            n.check(init(), "nvmlInit_v2")?;
            let bus = CString::new(bus_id).context("a PCI bus id without NUL")?;
            let mut dev = std::ptr::null_mut();
            n.check(by_bus(bus.as_ptr(), &mut dev), "nvmlDeviceGetHandleByPciBusId_v2")
                .with_context(|| format!("the GPU at PCI {bus_id}"))?;
            n.dev = dev;
            Ok(n)
        }
    }

    fn check(&self, ret: Ret, what: &str) -> Result<()> {
        if ret == 0 {
            return Ok(());
        }
        // SAFETY: nvmlErrorString returns a static NUL-terminated string for any code.
        let msg = unsafe { CStr::from_ptr((self.error_string)(ret)) }.to_string_lossy();
        bail!("{what}: NVML error {ret} ({msg})")
    }

    /// Energy the GPU has drawn since the driver loaded, joules.
    pub fn energy_j(&self) -> Result<f64> {
        let mut mj: c_ulonglong = 0;
        // SAFETY: a valid handle and an out pointer to a live u64.
        self.check(
            unsafe { (self.energy)(self.dev, &mut mj) },
            "nvmlDeviceGetTotalEnergyConsumption",
        )?;
        Ok(mj as f64 * 1e-3)
    }

    /// The power limit the GPU enforces now, watts.
    pub fn power_limit_w(&self) -> Result<f64> {
        let mut mw: c_uint = 0;
        // SAFETY: as in energy_j.
        self.check(
            unsafe { (self.power_limit)(self.dev, &mut mw) },
            "nvmlDeviceGetEnforcedPowerLimit",
        )?;
        Ok(f64::from(mw) * 1e-3)
    }

    /// The board's power draw as NVML reports it now, watts.
    pub fn power_w(&self) -> Result<f64> {
        let mut mw: c_uint = 0;
        // SAFETY: as in energy_j.
        self.check(
            unsafe { (self.power)(self.dev, &mut mw) },
            "nvmlDeviceGetPowerUsage",
        )?;
        Ok(f64::from(mw) * 1e-3)
    }

    /// The SM clock now, MHz.
    pub fn sm_mhz(&self) -> Result<f64> {
        let mut mhz: c_uint = 0;
        // SAFETY: as in energy_j.
        self.check(
            unsafe { (self.clock)(self.dev, CLOCK_SM, &mut mhz) },
            "nvmlDeviceGetClockInfo",
        )?;
        Ok(f64::from(mhz))
    }

    /// Why the clocks are below their maximum now (NVML's clocks event
    /// reasons, e.g. [`ClockReasons::SW_POWER_CAP`]).
    pub fn clock_reasons(&self) -> Result<ClockReasons> {
        let f = self.reasons.context(
            "this driver's NVML has no nvmlDeviceGetCurrentClocksEventReasons (nor ...ThrottleReasons)",
        )?;
        let mut bits: c_ulonglong = 0;
        // SAFETY: as in energy_j.
        self.check(
            unsafe { f(self.dev, &mut bits) },
            "nvmlDeviceGetCurrentClocksEventReasons (or ...ThrottleReasons)",
        )?;
        Ok(ClockReasons(bits))
    }
}

/// NVML's clocks event reasons (`nvmlClocksEventReason*` in nvml.h): the
/// bits set while the clocks are held below their maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClockReasons(pub u64);

impl ClockReasons {
    /// Software power capping: the board holds its power limit.
    pub const SW_POWER_CAP: u64 = 0x4;

    /// The power limit holds the clocks down (software power cap).
    pub fn power_capped(self) -> bool {
        self.0 & Self::SW_POWER_CAP != 0
    }
}

/// NVML's PCI address (`DDDD:BB:DD.0`) from the CUDA device attributes
/// (domain, bus, device).
pub fn pci_bus_id(domain: i32, bus: i32, device: i32) -> String {
    format!("{domain:04x}:{bus:02x}:{device:02x}.0")
}

/// One half of a step (or a whole step) run back to back for a while:
/// its time and energy per step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sustained {
    /// Wall time per step, seconds.
    pub secs: f64,
    /// Energy per step, joules (the board's, idle draw included).
    pub joules: f64,
}

impl Sustained {
    /// Mean power over the run, watts.
    pub fn watts(&self) -> f64 {
        self.joules / self.secs
    }
}

/// The shortest time a perfect overlap of `prefill` and `decode` (each run
/// alone) can take on a GPU that holds `cap_w` with `idle_w` drawn at
/// idle: the longer half, or the time their energy above idle needs at the
/// cap's headroom above idle, whichever is longer. A first-order model: it
/// takes each half's energy per step as fixed, where a lower clock under
/// overlap spends less on the same work (lower voltage), and static power
/// runs for a shorter step. On the H200 it is no bound: each half alone
/// already drew the cap (NVML's counter read 680-750 W over 250 ms against
/// the 700 W limit), so it predicted a median 0.96x, and the slim pair on
/// two streams ran 1.045x median over the best serial pair under the same
/// load, with 4.7 % less energy a step (results/2026-12-05-h200-podfi-energy).
/// Read it as where overlap would stand if it saved no energy.
pub fn cap_bound_s(prefill: Sustained, decode: Sustained, cap_w: f64, idle_w: f64) -> f64 {
    let above_idle = |s: Sustained| (s.joules - idle_w * s.secs).max(0.0);
    let energy = (above_idle(prefill) + above_idle(decode)) / (cap_w - idle_w).max(1.0);
    prefill.secs.max(decode.secs).max(energy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_id_is_nvml_format() {
        assert_eq!(pci_bus_id(0, 0x1b, 0), "0000:1b:00.0");
        assert_eq!(pci_bus_id(1, 200, 31), "0001:c8:1f.0");
    }

    #[test]
    fn cap_bound_takes_the_longest_limit() {
        // Both halves cool: the longer half bounds the overlap.
        let p = Sustained {
            secs: 1.0,
            joules: 300.0,
        };
        let d = Sustained {
            secs: 0.5,
            joules: 150.0,
        };
        assert_eq!(cap_bound_s(p, d, 700.0, 100.0), 1.0);
        // A prefill at the cap and a decode at 400 W: the decode's 300 W
        // above idle over 1 s needs 0.5 s of the cap's 600 W headroom.
        let p = Sustained {
            secs: 1.0,
            joules: 700.0,
        };
        let d = Sustained {
            secs: 1.0,
            joules: 400.0,
        };
        let t = cap_bound_s(p, d, 700.0, 100.0);
        assert!((t - 1.5).abs() < 1e-12, "{t}");
        // So the best overlap is 2 / 1.5 over the serial pair, not 2.
        assert!(((p.secs + d.secs) / t - 4.0 / 3.0).abs() < 1e-12);
        assert_eq!(p.watts(), 700.0);
    }

    #[test]
    fn clock_reasons_read_nvml_bits() {
        assert!(ClockReasons(0x4).power_capped());
        assert!(ClockReasons(0x5).power_capped());
        assert!(!ClockReasons(0x1).power_capped());
    }

    #[test]
    fn missing_library_is_a_clear_error() {
        // Where the driver is installed this opens (or fails on the bus id);
        // without it the error names the library.
        if let Err(e) = Nvml::open("0000:00:00.0") {
            let msg = format!("{e:#}");
            assert!(msg.contains("NVML") || msg.contains("PCI"), "{msg}");
        }
    }
}
