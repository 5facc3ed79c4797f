//! Reading a daemon's Prometheus endpoint (`FN_METRICS_PORT`) in tests and tools.

use anyhow::{Context, ensure};

use crate::http;

/// The exposition text at `address`'s `/metrics`.
///
/// # Errors
/// When the endpoint does not answer 200.
pub async fn scrape(address: &str) -> anyhow::Result<String> {
    let reply = http::get(address, "/metrics")
        .await
        .with_context(|| format!("scraping {address}"))?;
    ensure!(reply.status == 200, "{address}: {reply:?}");
    Ok(reply.text())
}

/// The value of the sample `series` (name and labels exactly as exposed), if present.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The sum of every sample of metric `name` whatever its labels (0 when there is none).
pub fn sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let value = match rest.strip_prefix('{') {
                Some(labelled) => labelled.split_once("} ")?.1,
                None => rest.strip_prefix(' ')?,
            };
            value.split_whitespace().next()?.parse::<f64>().ok()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str =
        "# TYPE c counter\nc_total{f=\"a\"} 2\nc_total{f=\"b\"} 3.5\nc_total_x 9\ng 4\n# EOF\n";

    #[test]
    fn samples_and_sums() {
        assert_eq!(sample(TEXT, "c_total{f=\"b\"}"), Some(3.5));
        assert_eq!(sample(TEXT, "g"), Some(4.0));
        assert_eq!(sample(TEXT, "nope"), None);
        assert_eq!(
            sum(TEXT, "c_total"),
            5.5,
            "other names with the prefix are not counted"
        );
        assert_eq!(sum(TEXT, "g"), 4.0);
        assert_eq!(sum(TEXT, "nope"), 0.0);
    }
}
