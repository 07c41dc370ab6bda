//! The soak's one-minute version (`make soak` runs ten): four cameras' sessions through
//! the NAT lab's impaired link, rebound halfway; nothing may leak or go missing.

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic

use std::{path::Path, time::Duration};

use bench::soak::{run, Plan};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minute_of_impaired_rebinding_traffic_loses_and_leaks_nothing() {
    let plan = Plan::new(Duration::from_secs(60));
    let report = run(&plan, Path::new(env!("CARGO_BIN_EXE_bench")))
        .await
        .unwrap();
    eprintln!("{}", report.markdown());
    assert_eq!(report.failures(), Vec::<String>::new());
    assert!(report.rebindings >= 1, "{report:?}");
    // Every camera ran sessions back to back: at least two each in the minute.
    assert!(report.sessions >= 2 * plan.cameras as u64, "{report:?}");
}
