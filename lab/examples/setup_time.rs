//! Measures lab set-up (and teardown) time for a few sizes:
//! `cargo run --release -p fleetcast-lab --example setup_time [sizes...]` (default 1 16 64).

use fleetcast_lab::{Lab, LabConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let sizes = if sizes.is_empty() {
        vec![1, 16, 64]
    } else {
        sizes
    };
    for n in sizes {
        let mut times = Vec::new();
        for _ in 0..5 {
            let lab = Lab::new(LabConfig::hosts(n))?;
            times.push(lab.setup_time());
        }
        times.sort();
        println!(
            "{n:>4} hosts: set-up min {:?}, median {:?}, max {:?} (5 runs)",
            times[0], times[2], times[4]
        );
    }
    Ok(())
}
