//! The frames a test uses: the kernel's allocator as the address space's
//! table allocator, runs of data frames lent to the running test, and a
//! small pool for the `x86_64` crate's `Mapper`.
//!
//! Invariant: every run lent is recorded in a loan slot until it is given
//! back, so the harness can return whatever a failed test kept.

use pvmmu::{FrameAllocator, Pfn};
use x86_64::structures::paging::{FrameAllocator as X86FrameAllocator, PhysFrame, Size4KiB};
use x86_64::PhysAddr;

use crate::frames::Frames;
use crate::selftest::{Failure, TestResult};

/// Most runs of data frames a test borrows at once.
pub(super) const MAX_LOANS: usize = 8;

/// The kernel's allocator as the address space sees it (tables), plus the
/// runs of data frames the running test borrowed.
pub(crate) struct TableFrames<'k> {
    pub(super) frames: &'k mut Frames,
    pub(super) loans: [Option<(u64, u64)>; MAX_LOANS],
}

impl FrameAllocator for TableFrames<'_> {
    fn allocate(&mut self) -> Option<Pfn> {
        self.frames.allocate_lowest()
    }
    fn free(&mut self, pfn: Pfn) {
        if let Err(e) = self.frames.try_free(pfn) {
            log::error!("table frame {pfn:?} not taken back: {e:?}");
        }
    }
}

impl TableFrames<'_> {
    /// Takes `n` contiguous free frames, the first a multiple of `align`.
    pub(super) fn take_run(&mut self, n: u64, align: u64) -> Option<Pfn> {
        let slot = self.loans.iter().position(Option::is_none)?;
        let start = self.frames.ranges().iter().find_map(|r| {
            let start = r.start.next_multiple_of(align);
            (start.checked_add(n)? <= r.end).then_some(start)
        })?;
        self.frames.reserve(start, start + n).ok()?;
        self.loans[slot] = Some((start, n));
        Some(Pfn(start))
    }

    /// Gives back the run starting at `start`.
    pub(super) fn give_back(&mut self, start: Pfn) -> TestResult {
        let slot = self
            .loans
            .iter()
            .position(|l| matches!(l, Some((s, _)) if *s == start.0))
            .ok_or(Failure::Check("gave back a run that was not lent"))?;
        if let Some((s, n)) = self.loans[slot].take() {
            self.frames
                .add(s, s + n)
                .map_err(|_| Failure::Check("allocator refused a run back"))?;
        }
        Ok(())
    }

    /// Gives back every run still lent; returns how many there were.
    pub(super) fn give_back_all(&mut self) -> u64 {
        let mut n = 0;
        for slot in 0..MAX_LOANS {
            if let Some((s, _)) = self.loans[slot] {
                n += 1;
                let _ = self.give_back(Pfn(s));
            }
        }
        n
    }

    pub(super) fn free_count(&self) -> u64 {
        self.frames.free_count()
    }
}

/// A few frames handed to the `x86_64` crate's `Mapper` as its allocator.
pub(super) struct X86Pool {
    pub(super) frames: [Pfn; 4],
    pub(super) len: usize,
}

// SAFETY: every frame in the pool was taken out of the kernel's allocator
// for this pool and is handed out at most once.
unsafe impl X86FrameAllocator<Size4KiB> for X86Pool {
    fn allocate_frame(&mut self) -> Option<PhysFrame<Size4KiB>> {
        self.len = self.len.checked_sub(1)?;
        Some(PhysFrame::containing_address(PhysAddr::new(
            self.frames[self.len].addr(),
        )))
    }
}
