//! Half-open frame ranges and a small fixed-capacity set of them.
//!
//! Invariant: a [`RangeSet`] holds sorted, non-overlapping, non-adjacent
//! (coalesced) non-empty ranges, so membership is a binary search and the
//! number of ranges stays as small as the data allows.

use crate::types::Pfn;

/// Frames `start..end` (half-open).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PfnRange {
    /// First frame.
    pub start: Pfn,
    /// One past the last frame.
    pub end: Pfn,
}

impl PfnRange {
    /// `start..end`; empty when `end <= start`.
    pub const fn new(start: u64, end: u64) -> Self {
        Self {
            start: Pfn(start),
            end: Pfn(end),
        }
    }
    /// Number of frames.
    pub const fn len(&self) -> u64 {
        self.end.0.saturating_sub(self.start.0)
    }
    /// True when the range has no frame.
    pub const fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// True when `pfn` lies in the range.
    pub const fn contains(&self, pfn: Pfn) -> bool {
        pfn.0 >= self.start.0 && pfn.0 < self.end.0
    }
    /// The overlap of two ranges (possibly empty).
    pub fn intersect(&self, other: &PfnRange) -> PfnRange {
        PfnRange::new(self.start.0.max(other.start.0), self.end.0.min(other.end.0))
    }
}

/// The set is full: more disjoint ranges than its capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeSetFull;

/// A set of frames stored as at most `N` coalesced ranges.
#[derive(Debug, Clone)]
pub struct RangeSet<const N: usize> {
    ranges: [PfnRange; N],
    len: usize,
}

impl<const N: usize> Default for RangeSet<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> RangeSet<N> {
    /// The empty set.
    pub const fn new() -> Self {
        Self {
            ranges: [PfnRange::new(0, 0); N],
            len: 0,
        }
    }

    /// The ranges, sorted.
    pub fn ranges(&self) -> &[PfnRange] {
        &self.ranges[..self.len]
    }

    /// Total number of frames.
    pub fn frames(&self) -> u64 {
        self.ranges().iter().map(PfnRange::len).sum()
    }

    /// True when `pfn` is in the set.
    pub fn contains(&self, pfn: Pfn) -> bool {
        let r = self.ranges();
        // First range whose end is above pfn.
        let i = r.partition_point(|x| x.end.0 <= pfn.0);
        i < r.len() && r[i].contains(pfn)
    }

    /// Adds `range` (merging with neighbours). On [`RangeSetFull`] the set is
    /// unchanged.
    pub fn insert(&mut self, range: PfnRange) -> Result<(), RangeSetFull> {
        if range.is_empty() {
            return Ok(());
        }
        let (mut start, mut end) = (range.start.0, range.end.0);
        // Ranges that touch or overlap [start, end) form one run [lo, hi).
        let lo = self.ranges().partition_point(|x| x.end.0 < start);
        let mut hi = lo;
        while hi < self.len && self.ranges[hi].start.0 <= end {
            start = start.min(self.ranges[hi].start.0);
            end = end.max(self.ranges[hi].end.0);
            hi += 1;
        }
        let merged = PfnRange::new(start, end);
        if hi == lo {
            if self.len == N {
                return Err(RangeSetFull);
            }
            self.ranges.copy_within(lo..self.len, lo + 1);
            self.len += 1;
        } else {
            self.ranges.copy_within(hi..self.len, lo + 1);
            self.len -= hi - lo - 1;
        }
        self.ranges[lo] = merged;
        Ok(())
    }

    /// Removes `range` from the set. Splitting one range in two needs a free
    /// slot; on [`RangeSetFull`] the set is unchanged.
    pub fn remove(&mut self, range: PfnRange) -> Result<(), RangeSetFull> {
        if range.is_empty() {
            return Ok(());
        }
        let mut i = 0;
        while i < self.len {
            let cur = self.ranges[i];
            let cut = cur.intersect(&range);
            if cut.is_empty() {
                i += 1;
                continue;
            }
            let left = PfnRange::new(cur.start.0, cut.start.0);
            let right = PfnRange::new(cut.end.0, cur.end.0);
            match (left.is_empty(), right.is_empty()) {
                (true, true) => {
                    self.ranges.copy_within(i + 1..self.len, i);
                    self.len -= 1;
                }
                (false, true) => {
                    self.ranges[i] = left;
                    i += 1;
                }
                (true, false) => {
                    self.ranges[i] = right;
                    i += 1;
                }
                (false, false) => {
                    if self.len == N {
                        return Err(RangeSetFull);
                    }
                    self.ranges.copy_within(i + 1..self.len, i + 2);
                    self.len += 1;
                    self.ranges[i] = left;
                    self.ranges[i + 1] = right;
                    i += 2;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::BTreeSet;

    #[test]
    fn matches_a_plain_set() {
        // Deterministic pseudo-random inserts and removes against a BTreeSet.
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut set = RangeSet::<256>::new();
        let mut model = BTreeSet::new();
        for _ in 0..4000 {
            let a = next() % 500;
            let b = a + next() % 20;
            let r = PfnRange::new(a, b);
            if next() % 3 == 0 {
                set.remove(r).unwrap();
                for p in a..b {
                    model.remove(&p);
                }
            } else {
                set.insert(r).unwrap();
                model.extend(a..b);
            }
            for w in set.ranges().windows(2) {
                assert!(
                    w[0].end.0 < w[1].start.0,
                    "not coalesced: {:?}",
                    set.ranges()
                );
            }
            assert_eq!(set.frames(), model.len() as u64);
        }
        for p in 0..520 {
            assert_eq!(set.contains(Pfn(p)), model.contains(&p), "pfn {p}");
        }
    }

    #[test]
    fn full_set_is_unchanged() {
        let mut set = RangeSet::<2>::new();
        set.insert(PfnRange::new(0, 2)).unwrap();
        set.insert(PfnRange::new(4, 6)).unwrap();
        assert_eq!(set.insert(PfnRange::new(8, 9)), Err(RangeSetFull));
        assert_eq!(set.remove(PfnRange::new(1, 2)), Ok(()));
        assert_eq!(set.remove(PfnRange::new(4, 5)), Ok(()));
        assert_eq!(set.ranges(), &[PfnRange::new(0, 1), PfnRange::new(5, 6)]);
        set.insert(PfnRange::new(1, 5)).unwrap();
        assert_eq!(set.ranges(), &[PfnRange::new(0, 6)]);
        set.insert(PfnRange::new(10, 12)).unwrap();
        assert_eq!(set.remove(PfnRange::new(2, 3)), Err(RangeSetFull));
        assert_eq!(set.ranges(), &[PfnRange::new(0, 6), PfnRange::new(10, 12)]);
    }
}
