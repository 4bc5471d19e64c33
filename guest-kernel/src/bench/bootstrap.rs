//! The bootstrap's own figures: what building this boot's direct map cost,
//! per page, in hypercalls and in `mmu_update` entries.
//!
//! The bootstrap runs once per boot, so each figure is one sample, not a
//! median. Natively it is comparable with PV (always 4 KiB pages) only when
//! the direct map was built from 4 KiB pages too (`pvmmu.4k`); otherwise
//! the figure carries another name and is not paired.

use crate::selftest::{check, check_eq, Failure, TestResult};
use crate::Kernel;

use super::figure::{emit, Per};

/// Emits the bootstrap's figures.
pub fn bootstrap(kernel: &mut Kernel) -> TestResult {
    let dm = kernel
        .direct_map
        .as_ref()
        .ok_or(Failure::Check("no direct map"))?;
    let r = &dm.report;
    check(r.pages_mapped > 0, "bootstrap mapped no page")?;
    let pv = kernel.pv.is_some();
    let name = if pv || kernel.options.only_4k {
        "bootstrap-4k"
    } else {
        "bootstrap-large-pages"
    };
    let per_page = Per {
        total: dm.cycles,
        count: r.pages_mapped,
    };
    emit(format_args!("{name}"), per_page, "cycles/page");
    emit(
        format_args!("{name}-tables"),
        Per {
            total: r.tables_created,
            count: 1,
        },
        "tables/call",
    );
    if pv {
        emit(
            format_args!("{name}-hypercalls"),
            Per {
                total: r.hypercalls,
                count: 1,
            },
            "hypercalls/call",
        );
        emit(
            format_args!("{name}-entries"),
            Per {
                total: r.mmu_update_entries,
                count: 1,
            },
            "entries/call",
        );
    } else {
        check_eq("native bootstrap hypercalls", r.hypercalls, 0)?;
    }
    Ok(())
}
