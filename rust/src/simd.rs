//! The one dispatch point for SIMD kernels.
//!
//! The level is detected once at run time. `PBCODEC_SIMD=scalar|avx2|avx512`
//! selects one (a level the CPU lacks falls back to detection; `set_level`
//! rejects it), so every path can be forced and tested on one machine.
//!
//! Every kernel family (bit-packing, CRC-32C, decompression, the row-wise
//! matvec, the int8 and float32 layout kernels) has one table per level, looked
//! up through its module's `table(level)`; public functions pass [`level()`],
//! tests loop over [`available()`]. A table lookup clamps the level with
//! `runnable`, so no table of a level the CPU lacks is ever handed out: that
//! is what makes calling its `unsafe` entries sound.
//!
//! AVX-512 is the default where detected: its kernels pass the full test
//! suite (every kernel against the scalar path and the Python reference) on
//! AMD Zen 4.
use std::sync::atomic::{AtomicU8, Ordering};

/// A SIMD level: the instruction sets a kernel table may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Level {
    /// Portable Rust, no target features.
    Scalar = 1,
    /// AVX2 + FMA + BMI2 + POPCNT + SSE4.2.
    Avx2 = 2,
    /// AVX-512 F/BW/VL/VBMI/VBMI2 (Ice Lake and later, Zen 4), plus everything of `Avx2`.
    Avx512 = 3,
}

impl Level {
    /// The level's name as `PBCODEC_SIMD` spells it: `scalar`, `avx2` or `avx512`.
    pub fn name(self) -> &'static str {
        match self {
            Level::Scalar => "scalar",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }

    /// Parse a level name (case-insensitive, surrounding whitespace ignored).
    pub fn parse(s: &str) -> Option<Level> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scalar" => Some(Level::Scalar),
            "avx2" => Some(Level::Avx2),
            "avx512" => Some(Level::Avx512),
            _ => None,
        }
    }
}

/// The best level this CPU supports (detected once, then cached).
pub fn detected() -> Level {
    static DETECTED: AtomicU8 = AtomicU8::new(0);
    match DETECTED.load(Ordering::Relaxed) {
        0 => {
            let l = detect();
            DETECTED.store(l as u8, Ordering::Relaxed);
            l
        }
        v => from_u8(v),
    }
}

fn detect() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("bmi2")
            && is_x86_feature_detected!("popcnt")
            && is_x86_feature_detected!("sse4.2");
        if avx2
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vbmi")
            && is_x86_feature_detected!("avx512vbmi2")
        {
            return Level::Avx512;
        }
        if avx2 {
            return Level::Avx2;
        }
    }
    Level::Scalar
}

/// `level`, lowered to what this CPU supports. Kernel tables are looked up
/// through it, so a table's target features are always present when its
/// entries run, whatever level a caller asks for.
#[inline]
pub(crate) fn runnable(level: Level) -> Level {
    level.min(detected())
}

/// Whether the CPU has AVX-512 VNNI (`vpdpbusd`), used by the int8 kernels
/// on the AVX-512 level; without it they use the AVX2 kernel.
pub fn has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512vnni") {
            return true;
        }
    }
    false
}

/// Every level this CPU can run, lowest first.
pub fn available() -> Vec<Level> {
    [Level::Scalar, Level::Avx2, Level::Avx512].into_iter().filter(|&l| l <= detected()).collect()
}

static CURRENT: AtomicU8 = AtomicU8::new(0);

fn from_u8(v: u8) -> Level {
    match v {
        3 => Level::Avx512,
        2 => Level::Avx2,
        _ => Level::Scalar,
    }
}

/// The level kernels use now: the env cap (if valid and supported) or detection.
#[inline]
pub fn level() -> Level {
    let v = CURRENT.load(Ordering::Relaxed);
    if v != 0 {
        return from_u8(v);
    }
    let det = detected();
    let lvl = match std::env::var("PBCODEC_SIMD").ok().as_deref().and_then(Level::parse) {
        Some(req) if req <= det => req,
        _ => det,
    };
    CURRENT.store(lvl as u8, Ordering::Relaxed);
    lvl
}

/// Force the level of this process (Python tests, benchmarks). Errors if the CPU
/// lacks it. Rust tests do not use it: they pass each level to the kernels explicitly.
pub fn set_level(lvl: Level) -> crate::Result<()> {
    if lvl > detected() {
        return crate::error::invalid(format!(
            "SIMD level {:?} is not supported by this CPU (best: {})",
            lvl.name(),
            detected().name()
        ));
    }
    CURRENT.store(lvl as u8, Ordering::Relaxed);
    Ok(())
}
