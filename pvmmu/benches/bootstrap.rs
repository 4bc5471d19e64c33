//! Bootstrap scaling against the Xen model: for 1, 4, 16 and 64 GiB of
//! simulated dom0 memory, the rounds, tables, hypercalls and `mmu_update`
//! entries the PV direct-map bootstrap needs, per GiB. The model keeps memory
//! proportional to the frames touched (the tables), so 64 GiB runs here.
//!
//! Prints a table and one `BENCH <name> <value> <unit>` line per figure.

use pvmmu::bootstrap::sim::run_pv;

fn main() {
    println!("| guest | rounds | tables | tables/GiB | hypercalls | hypercalls/GiB | entries | entries/GiB |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for gib in [1u64, 4, 16, 64] {
        let run = match run_pv(gib << 18, 0x400, 2048) {
            Ok(run) => run,
            Err(e) => {
                eprintln!("bootstrap of {gib} GiB failed: {e:?}");
                std::process::exit(1);
            }
        };
        let r = &run.report;
        let per = |x: u64| x as f64 / gib as f64;
        println!(
            "| {gib} GiB | {} | {} | {:.1} | {} | {:.2} | {} | {:.1} |",
            r.rounds,
            r.tables_created,
            per(r.tables_created),
            r.hypercalls,
            per(r.hypercalls),
            r.mmu_update_entries,
            per(r.mmu_update_entries)
        );
        println!("BENCH bootstrap-pv-{gib}gib-rounds {} rounds", r.rounds);
        println!(
            "BENCH bootstrap-pv-{gib}gib-tables-per-gib {:.1} tables",
            per(r.tables_created)
        );
        println!(
            "BENCH bootstrap-pv-{gib}gib-hypercalls-per-gib {:.2} calls",
            per(r.hypercalls)
        );
        println!(
            "BENCH bootstrap-pv-{gib}gib-entries-per-gib {:.1} entries",
            per(r.mmu_update_entries)
        );
    }
}
