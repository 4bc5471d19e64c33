//! Lazy batches and their hypercall cost.

use pvmmu::space::Flush;
use pvmmu::Pfn;

use crate::directmap::DirectMem;
use crate::selftest::{check, check_eq, TestResult};

use super::backends::LiveBackend;
use super::harness::{slot_in_use, Cx};
use super::steps::{failed, give, pattern, read, take, write};
use super::{MIB2, NX, P, PAGE, RW, TEST_AREA};

/// A lazy batch of 512 one-page maps reaches Xen in a handful of
/// hypercalls (one per 512 queued entries), and so does the unmap of 448
/// pages one by one, where 64 unmaps outside a batch cost at least one
/// hypercall each; natively no hypercall at all. Queued entries are seen by
/// translate before the flush. Under DEBUG_PAGEALLOC the hypercalls and
/// entries of the allocator's map-backs and unmaps (the test area's table
/// frames) are subtracted (`pagealloc::issued`): they are not the batch's.
pub(super) fn lazy_batch_hypercalls<B: LiveBackend>(cx: &mut Cx<'_, B>) -> TestResult {
    let n = 512u64;
    let pfn = take(cx, n)?;
    let va = TEST_AREA + 20 * MIB2;
    // DEBUG_PAGEALLOC's hypercalls (the new tables' frames mapped back in
    // the direct map as the allocator hands them out, the freed ones
    // unmapped) are not the batch's: counted apart and subtracted.
    let pa0 = crate::pagealloc::issued();
    let s0 = cx.space.backend().counters();
    let mut batch = cx.space.lazy();
    for k in 0..n {
        batch
            .map(va + k * PAGE, Pfn(pfn.0 + k), PAGE, P | RW | NX)
            .map_err(failed("map in a batch"))?
            .ignore(); // x86 caches no not-present entry: nothing to flush
    }
    let seen = batch
        .lookup(va + (n - 1) * PAGE)
        .map_err(failed("translate in a batch"));
    let pending = batch.backend().pending();
    batch.finish().map_err(failed("end of the batch"))?;
    let s1 = cx.space.backend().counters();
    let pa1 = crate::pagealloc::issued();
    check_eq("frame seen inside the batch", seen?.pfn.0, pfn.0 + n - 1)?;
    let (calls, entries) = (
        s1.hypercalls - s0.hypercalls - (pa1.0 - pa0.0),
        s1.mmu_update_entries - s0.mmu_update_entries - (pa1.1 - pa0.1),
    );
    log::info!(
        "lazy map of {n} pages: {calls} hypercalls, {entries} mmu_update entries (and {} \
         hypercalls, {} entries of DEBUG_PAGEALLOC's)",
        pa1.0 - pa0.0,
        pa1.1 - pa0.1
    );
    if cx.pv {
        check(pending > 0, "nothing queued inside the batch")?;
        // 512 leaves + 3 tables (sealing up to 2 aliases each, 1 hook).
        check(calls <= 3, "lazy map: more than 3 hypercalls")?;
        check(
            (n..=n + 7).contains(&entries),
            "lazy map: mmu_update entries out of range",
        )?;
    } else {
        check_eq("native hypercalls", calls, 0)?;
    }
    for k in [0, 1, 255, 511] {
        let frame = Pfn(pfn.0 + k);
        let value = pattern(frame, k, 4);
        // SAFETY: the page maps a frame of the borrowed run.
        unsafe { write("write after the batch", va + k * PAGE, value) }?;
        check_eq("read back", read("read", DirectMem::va(frame))?, value)?;
    }

    // Outside a batch: every call drains.
    let u = 64;
    let pa2 = crate::pagealloc::issued().0;
    let s2 = cx.space.backend().counters();
    for k in 0..u {
        let f = cx
            .space
            .unmap(va + k * PAGE, PAGE)
            .map_err(failed("unmap"))?;
        cx.space.flush(f).map_err(failed("flush"))?;
    }
    let s3 = cx.space.backend().counters();
    let pa3 = crate::pagealloc::issued().0;
    let unbatched = s3.hypercalls - s2.hypercalls - (pa3 - pa2);
    let mut flush = Flush::none();
    let mut batch = cx.space.lazy();
    for k in u..n {
        let f = batch
            .unmap(va + k * PAGE, PAGE)
            .map_err(failed("unmap in a batch"))?;
        flush = flush.merge(f);
    }
    batch.finish().map_err(failed("end of the unmap batch"))?;
    cx.space
        .flush(flush)
        .map_err(failed("flush after the batch"))?;
    let s4 = cx.space.backend().counters();
    let batched = s4.hypercalls - s3.hypercalls - (crate::pagealloc::issued().0 - pa3);
    log::info!(
        "unmap one page at a time: {u} pages {unbatched} hypercalls unbatched, {} pages {batched} in a batch",
        n - u
    );
    if cx.pv {
        check(
            unbatched >= u,
            "unbatched unmaps: fewer hypercalls than calls",
        )?;
        check(batched <= 4, "batched unmaps: more than 4 hypercalls")?;
    } else {
        check_eq("native hypercalls (unmap)", unbatched + batched, 0)?;
    }
    check(!slot_in_use(cx), "tables left after the batch")?;
    give(cx, pfn)
}
