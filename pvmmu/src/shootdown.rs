//! The cross-CPU TLB shootdown protocol (native paging; under Xen PV, Xen
//! does the IPIs for `MMUEXT_*_ALL` / `*_MULTI` and none of this runs).
//!
//! One request at a time: the initiator takes the `busy` flag, publishes
//! the request word and then a new generation number, asks every target
//! CPU to look (an IPI, through the caller's `notify`), and waits until
//! each target has acknowledged that generation. A target's handler reads
//! the generation, then the request (published before it), flushes, and
//! stores the generation as its acknowledgement. An initiator that waits
//! for the `busy` flag, or for acknowledgements, keeps serving requests
//! addressed to it (the caller's `serve` hook), so two CPUs shooting down
//! at each other cannot deadlock.
//!
//! Invariant: when [`Shootdown::initiate`] returns `Ok`, every target ran
//! its flush after the request was published (so after the caller's
//! page-table change, which happens before `initiate`); a target that does
//! not answer within the caller's patience is reported by number, never
//! waited for forever.
//!
//! The protocol is model-checked with `loom` (every interleaving of two and
//! three CPUs: `RUSTFLAGS="--cfg loom" cargo test -p pvmmu --test
//! loom_shootdown --release`); under `cfg(loom)` its atomics are loom's.

#[cfg(loom)]
use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering};

#[cfg(not(loom))]
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A target did not acknowledge in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShootdownTimeout {
    /// The CPU that did not answer.
    pub cpu: usize,
    /// The generation it was asked to acknowledge.
    pub generation: u64,
}

/// The protocol's shared state for up to `N` CPUs.
pub struct Shootdown<const N: usize> {
    busy: AtomicBool,
    generation: AtomicU64,
    request: AtomicU64,
    acked: [AtomicU64; N],
}

fn relax() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    core::hint::spin_loop();
}

impl<const N: usize> Shootdown<N> {
    /// No request yet.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        Self {
            busy: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            request: AtomicU64::new(0),
            acked: [const { AtomicU64::new(0) }; N],
        }
    }

    /// No request yet (loom's atomics are not `const`).
    #[cfg(loom)]
    pub fn new() -> Self {
        Self {
            busy: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            request: AtomicU64::new(0),
            acked: core::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// Publishes `request` to every CPU in `targets` (each `< N`, none of
    /// them `me`), calls `notify(cpu)` for each, and waits for their
    /// acknowledgements. While waiting it calls `serve()` (to answer a
    /// request addressed to this CPU) and `patience()`, which returns
    /// `false` once the caller will wait no longer.
    pub fn initiate(
        &self,
        targets: &[usize],
        request: u64,
        mut notify: impl FnMut(usize),
        mut serve: impl FnMut(),
        mut patience: impl FnMut() -> bool,
    ) -> Result<(), ShootdownTimeout> {
        while self
            .busy
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            serve();
            relax();
        }
        let generation = self.generation.load(Ordering::Relaxed) + 1;
        self.request.store(request, Ordering::SeqCst);
        self.generation.store(generation, Ordering::SeqCst);
        for &cpu in targets {
            notify(cpu);
        }
        let mut result = Ok(());
        for &cpu in targets {
            // SeqCst, not Acquire: a spin-wait must eventually see the
            // acknowledgement (loom explores acquire loads that keep
            // returning the old value for ever; on x86 both are a `mov`).
            while self.acked[cpu].load(Ordering::SeqCst) < generation {
                if !patience() {
                    result = Err(ShootdownTimeout { cpu, generation });
                    break;
                }
                serve();
                relax();
            }
            if result.is_err() {
                break;
            }
        }
        self.busy.store(false, Ordering::SeqCst);
        result
    }

    /// The target side (the IPI handler of CPU `me`): runs `flush` with the
    /// current request if there is one it has not acknowledged, then
    /// acknowledges. Returns whether it flushed.
    pub fn handle(&self, me: usize, flush: impl FnOnce(u64)) -> bool {
        let generation = self.generation.load(Ordering::SeqCst);
        if self.acked[me].load(Ordering::SeqCst) >= generation {
            return false;
        }
        let request = self.request.load(Ordering::SeqCst);
        flush(request);
        self.acked[me].fetch_max(generation, Ordering::SeqCst);
        true
    }

    /// The generation of the last request.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }
}

#[cfg(not(loom))]
impl<const N: usize> Default for Shootdown<N> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_target_that_answers_is_flushed_with_the_request() {
        let s: Shootdown<2> = Shootdown::new();
        let mut flushed = None;
        let r = s.initiate(
            &[1],
            0xabc000,
            |_| {},
            || {
                s.handle(1, |req| flushed = Some(req));
            },
            || true,
        );
        assert_eq!(r, Ok(()));
        assert_eq!(flushed, Some(0xabc000));
        assert_eq!(s.generation(), 1);
        // A second look at the same generation does nothing.
        assert!(!s.handle(1, |_| panic!("flushed twice")));
    }

    #[test]
    fn a_target_that_never_answers_is_named() {
        let s: Shootdown<3> = Shootdown::new();
        let mut patience = 3;
        let r = s.initiate(
            &[2],
            7,
            |_| {},
            || {},
            || {
                patience -= 1;
                patience > 0
            },
        );
        assert_eq!(
            r,
            Err(ShootdownTimeout {
                cpu: 2,
                generation: 1
            })
        );
        // The protocol is free again for the next initiator.
        let r = s.initiate(&[], 8, |_| {}, || {}, || true);
        assert_eq!(r, Ok(()));
    }
}
