//! Self-tests of pvmmu's address space on real memory, through the live
//! tree: map frames from the allocator at a test area, write through one
//! mapping and read the same bytes through the direct map, translate,
//! protect, execute, unmap, the typed errors, Xen's refusal of a writable
//! page-table mapping, lazy batches and their hypercall cost, 2 MiB pages
//! natively, and the `x86_64` crate's `Mapper`/`Translate` traits. The same
//! test bodies run on both backends (generic over
//! [`backends::LiveBackend`]).
//!
//! Invariant: a test touches the live tree only inside the test area (L4
//! slot [`TEST_SLOT`], clear of the direct map, the kernel image and Xen's
//! hole), which is empty before and after every test; after each test the
//! harness ([`harness`]) unmaps whatever a failed test left there, returns
//! the frames it borrowed, and requires the allocator's free count to be
//! what it was, the slot to be empty again and pvmmu's invariant walker to
//! find nothing wrong with the whole live tree.
//!
//! Layout: this file holds the suite (the test names, in the order they
//! run) and the test area; [`harness`], [`backends`], [`frames`] and
//! [`steps`] are the machinery; every other file is one topic's tests.

mod backends;
mod errors;
mod frames;
mod harness;
mod large_pages;
mod lazy;
mod map;
mod protect;
mod pv_refusals;
mod stale;
mod steps;
mod unmap;
mod x86_64_traits;

use pvmmu::entry::Flags;
use pvmmu::PAGE_SIZE;

use crate::selftest::{Only, SelfTest, TestResult};

/// The live address space and its steps, for the in-kernel benchmarks.
pub(crate) use backends::LiveBackend;
pub(crate) use harness::{check_invariants, live, Cx};
pub(crate) use large_pages::aligned_ram;
pub(crate) use steps::{failed, give, map, pattern, protect, read, take, unmap, write};

/// L4 slot of the test area (where Linux keeps vmalloc).
pub const TEST_SLOT: usize = 402;
/// First address of the test area.
pub const TEST_AREA: u64 = 0xffff_c900_0000_0000;
/// Bytes of the test area (one L4 slot).
const TEST_AREA_BYTES: u64 = 1 << 39;

const P: Flags = Flags::PRESENT;
const RW: Flags = Flags::WRITABLE;
const NX: Flags = Flags::NO_EXECUTE;
const PAGE: u64 = PAGE_SIZE;
const MIB2: u64 = 2 << 20;

/// A test body, run on either backend.
type Body<B> = fn(&mut Cx<'_, B>) -> TestResult;

/// Registers a test that runs on both backends.
macro_rules! live_test {
    ($name:literal, $body:path) => {
        SelfTest::new($name, |kernel| live(kernel, $body, $body))
    };
    ($name:literal, $only:expr, $body:path) => {
        SelfTest::only($name, $only, |kernel| live(kernel, $body, $body))
    };
}

/// The suite.
pub const SUITE: &[SelfTest] = &[
    live_test!("pvmmu_map_write_read_both_ways", map::map_write_read),
    live_test!(
        "pvmmu_translate_frames_and_flags",
        map::translate_frames_and_flags
    ),
    live_test!(
        "pvmmu_protect_read_only_faults",
        protect::protect_read_only_faults
    ),
    live_test!("pvmmu_execute_mapped_code", protect::execute_mapped_code),
    live_test!("pvmmu_invariants_report_wx", protect::invariants_report_wx),
    live_test!(
        "pvmmu_unmap_faults_and_frees_tables",
        unmap::unmap_frees_tables
    ),
    live_test!("pvmmu_range_across_tables", map::range_across_tables),
    live_test!(
        "pvmmu_no_stale_translation_after_any_shape",
        stale::no_stale_translation_after_any_shape
    ),
    live_test!(
        "pvmmu_errors_mapped_and_unmapped",
        errors::errors_mapped_unmapped
    ),
    live_test!(
        "pvmmu_errors_addresses_and_flags",
        errors::errors_addresses_flags
    ),
    live_test!(
        "pvmmu_refuses_writable_page_table",
        Only::XenPv,
        pv_refusals::refuses_writable_table
    ),
    live_test!(
        "pvmmu_new_tables_read_only_aliases",
        Only::XenPv,
        pv_refusals::tables_read_only_aliases
    ),
    live_test!(
        "pvmmu_lazy_batch_few_hypercalls",
        lazy::lazy_batch_hypercalls
    ),
    live_test!(
        "pvmmu_large_pages_2m",
        Only::HardwarePaging,
        large_pages::large_pages
    ),
    live_test!(
        "pvmmu_x86_64_mapper_translate",
        x86_64_traits::x86_64_traits
    ),
    SelfTest::new("pvmmu_random_stress", crate::stress::test),
];
