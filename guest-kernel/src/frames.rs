//! A frame allocator over the boot memory map.
//!
//! It keeps a sorted list of disjoint, non-adjacent free ranges of
//! pseudo-physical frames. It starts from the RAM regions of the memory map,
//! then everything in use is reserved out of it: the kernel image, natively
//! the low 1 MiB and the loader's tables; under Xen PV everything Xen placed
//! up to the end of its bootstrap page tables (p2m list, start_info, console
//! and store pages, initial tables) plus the boot stack page after them, and
//! a separately placed p2m list.
//!
//! Allocation takes the lowest free frame, so under PV frames come first
//! from the end of Xen's initial mapping (already mapped).
//!
//! Invariant: a frame is handed out at most once until it is freed, and a
//! frame that was reserved or never RAM is never handed out. Under
//! DEBUG_PAGEALLOC ([`Frames::set_debug_pagealloc`], `crate::pagealloc`)
//! a frame is unmapped from the direct map before it joins the free list
//! and mapped back after it leaves it, whichever call moves it (allocate,
//! free, reserve, add), so no free frame is ever reachable there.

use pvmmu::Pfn;

/// Most free ranges tracked.
pub const MAX_RANGES: usize = 256;

/// A half-open range of frames `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameRange {
    /// First frame.
    pub start: u64,
    /// One past the last frame.
    pub end: u64,
}

impl FrameRange {
    /// Number of frames.
    pub const fn count(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }
    /// Whether `pfn` lies in the range.
    pub const fn contains(&self, pfn: u64) -> bool {
        self.start <= pfn && pfn < self.end
    }
}

/// Why a change to the free list was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// The free list is full; the range was not added.
    TooManyRanges,
    /// A freed frame was already free (double free).
    AlreadyFree(Pfn),
    /// `end < start`.
    InvertedRange,
}

/// The allocator.
#[derive(Clone)]
pub struct Frames {
    free: [FrameRange; MAX_RANGES],
    len: usize,
    allocated: u64,
    bad_frees: u64,
    /// DEBUG_PAGEALLOC: free frames are kept out of the direct map.
    debug_pagealloc: bool,
}

impl Frames {
    /// An allocator with no free frames.
    pub const fn new() -> Self {
        Frames {
            free: [FrameRange { start: 0, end: 0 }; MAX_RANGES],
            len: 0,
            allocated: 0,
            bad_frees: 0,
            debug_pagealloc: false,
        }
    }

    /// From now on (`on`), frames leaving the free list are mapped back in
    /// the direct map and frames joining it are unmapped
    /// (`crate::pagealloc`); the caller has unmapped the free ones.
    pub fn set_debug_pagealloc(&mut self, on: bool) {
        self.debug_pagealloc = on;
    }

    /// The free ranges, sorted.
    pub fn ranges(&self) -> &[FrameRange] {
        &self.free[..self.len]
    }

    /// Free frames in total.
    pub fn free_count(&self) -> u64 {
        self.ranges().iter().map(FrameRange::count).sum()
    }

    /// Frames handed out and not freed.
    pub fn allocated(&self) -> u64 {
        self.allocated
    }

    /// Frees refused through [`pvmmu::FrameAllocator::free`] (double frees).
    pub fn bad_frees(&self) -> u64 {
        self.bad_frees
    }

    /// Whether `pfn` is free.
    pub fn is_free(&self, pfn: Pfn) -> bool {
        self.ranges().iter().any(|r| r.contains(pfn.0))
    }

    /// Adds `[start, end)` to the free frames; frames already free in it stay
    /// free (used to build the list from RAM regions).
    pub fn add(&mut self, start: u64, end: u64) -> Result<(), FrameError> {
        if end < start {
            return Err(FrameError::InvertedRange);
        }
        if end == start {
            return Ok(());
        }
        if self.debug_pagealloc {
            // The parts not free yet leave the direct map first.
            let mut at = start;
            for r in self.ranges() {
                if r.end <= at || r.start >= end {
                    continue;
                }
                if r.start > at {
                    crate::pagealloc::on_free(at, r.start - at);
                }
                at = at.max(r.end);
            }
            if at < end {
                crate::pagealloc::on_free(at, end - at);
            }
        }
        let mut new = FrameRange { start, end };
        // Absorb every range that overlaps or touches `new`.
        let mut i = 0;
        while i < self.len {
            let r = self.free[i];
            if r.end >= new.start && r.start <= new.end {
                new.start = new.start.min(r.start);
                new.end = new.end.max(r.end);
                self.remove_at(i);
            } else {
                i += 1;
            }
        }
        self.insert_sorted(new)
    }

    /// Removes `[start, end)` from the free frames (whatever part of it is
    /// free).
    pub fn reserve(&mut self, start: u64, end: u64) -> Result<(), FrameError> {
        if end < start {
            return Err(FrameError::InvertedRange);
        }
        let mut i = 0;
        while i < self.len {
            let r = self.free[i];
            if r.end <= start || r.start >= end {
                i += 1;
                continue;
            }
            let left = FrameRange {
                start: r.start,
                end: start,
            };
            let right = FrameRange {
                start: end,
                end: r.end,
            };
            self.remove_at(i);
            if right.count() > 0 {
                self.insert_sorted(right)?;
            }
            if left.count() > 0 {
                self.insert_sorted(left)?;
                i += 1;
            }
            if self.debug_pagealloc {
                let taken = r.start.max(start);
                crate::pagealloc::on_alloc(taken, r.end.min(end) - taken);
            }
        }
        Ok(())
    }

    /// Takes the lowest free frame.
    pub fn allocate_lowest(&mut self) -> Option<Pfn> {
        let first = self.ranges().first().copied()?;
        let pfn = first.start;
        if first.count() == 1 {
            self.remove_at(0);
        } else {
            self.free[0].start += 1;
        }
        self.allocated += 1;
        if self.debug_pagealloc {
            crate::pagealloc::on_alloc(pfn, 1);
        }
        Some(Pfn(pfn))
    }

    /// Gives `pfn` back.
    pub fn try_free(&mut self, pfn: Pfn) -> Result<(), FrameError> {
        if self.is_free(pfn) {
            return Err(FrameError::AlreadyFree(pfn));
        }
        self.add(pfn.0, pfn.0 + 1)?;
        self.allocated = self.allocated.saturating_sub(1);
        Ok(())
    }

    fn remove_at(&mut self, i: usize) {
        self.free.copy_within(i + 1..self.len, i);
        self.len -= 1;
    }

    fn insert_sorted(&mut self, r: FrameRange) -> Result<(), FrameError> {
        if self.len == MAX_RANGES {
            return Err(FrameError::TooManyRanges);
        }
        let at = self.ranges().partition_point(|x| x.start < r.start);
        self.free.copy_within(at..self.len, at + 1);
        self.free[at] = r;
        self.len += 1;
        Ok(())
    }
}

impl Default for Frames {
    fn default() -> Self {
        Self::new()
    }
}

impl pvmmu::FrameAllocator for Frames {
    fn allocate(&mut self) -> Option<Pfn> {
        self.allocate_lowest()
    }

    fn free(&mut self, pfn: Pfn) {
        if let Err(e) = self.try_free(pfn) {
            self.bad_frees += 1;
            log::error!("frame free refused: {e:?}");
        }
    }
}
