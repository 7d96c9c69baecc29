//! Charts as inline SVG, drawn on the server: no script, no library, and
//! styled by classes from the embedded stylesheet (the CSP allows no inline
//! style).

use maud::{Markup, html};

const W: f64 = 640.0;
const H: f64 = 200.0;
const LEFT: f64 = 44.0;
const RIGHT: f64 = 8.0;
const TOP: f64 = 10.0;
const BOTTOM: f64 = 24.0;

/// One column of a count chart.
#[derive(Debug, Clone)]
pub struct Counts {
    /// Its label on the x axis.
    pub label: String,
    /// Requests in all.
    pub total: u64,
    /// Of which errors.
    pub errors: u64,
}

/// One point of a latency chart.
#[derive(Debug, Clone)]
pub struct Latency {
    /// Its label on the x axis.
    pub label: String,
    /// Median, ms.
    pub p50: u64,
    /// 99th percentile, ms.
    pub p99: u64,
}

/// A rounded-up axis maximum (1, 2 or 5 times a power of ten).
fn nice_max(max: u64) -> u64 {
    let mut step = 1u64;
    loop {
        for m in [1, 2, 5] {
            let candidate = step.saturating_mul(m);
            if candidate >= max || candidate == u64::MAX {
                return candidate.max(1);
            }
        }
        step = step.saturating_mul(10);
    }
}

/// How many grid steps divide `max` into whole numbers (at most 5).
fn ticks(max: u64) -> u64 {
    [5, 4, 2]
        .into_iter()
        .find(|n| max >= *n && max % n == 0)
        .unwrap_or(1)
}

fn axes(max: u64, labels: &[&str], unit: &str) -> Markup {
    let plot_w = W - LEFT - RIGHT;
    let base = H - BOTTOM;
    let n = labels.len().max(1) as f64;
    // At most ~8 x labels, evenly spread.
    let every = labels.len().div_ceil(8).max(1);
    html! {
        @let ticks = ticks(max);
        @for i in 0..=ticks {
            @let y = base - (base - TOP) * i as f64 / ticks as f64;
            line.grid x1=(LEFT) x2=(W - RIGHT) y1=(y) y2=(y) {}
            text.axis x=(LEFT - 4.0) y=(y + 4.0) text-anchor="end" {
                (max / ticks * i) (unit)
            }
        }
        @for (i, label) in labels.iter().enumerate() {
            @if i % every == 0 {
                text.axis x=(LEFT + plot_w * (i as f64 + 0.5) / n) y=(H - 6.0) text-anchor="middle" { (label) }
            }
        }
    }
}

/// Requests with their errors, as stacked bars.
pub fn counts(title: &str, points: &[Counts]) -> Markup {
    let max = nice_max(points.iter().map(|p| p.total).max().unwrap_or(0));
    let plot_w = W - LEFT - RIGHT;
    let base = H - BOTTOM;
    let n = points.len().max(1) as f64;
    let slot = plot_w / n;
    let bar = (slot * 0.7).max(1.0);
    let scale = |v: u64| (base - TOP) * v as f64 / max as f64;
    let labels: Vec<&str> = points.iter().map(|p| p.label.as_str()).collect();
    let total: u64 = points.iter().map(|p| p.total).sum();
    let errors: u64 = points.iter().map(|p| p.errors).sum();
    html! {
        figure.chart {
            figcaption {
                (title) " — " (total) " requests, " (errors) " errors"
                span.legend { span.sw.ok {} "ok" span.sw.err {} "errors" }
            }
            svg viewBox={ "0 0 " (W) " " (H) } role="img"
                aria-label={ (title) ": " (total) " requests, " (errors) " errors" } {
                (axes(max, &labels, ""))
                @for (i, p) in points.iter().enumerate() {
                    @let x = LEFT + slot * i as f64 + (slot - bar) / 2.0;
                    @let ok_h = scale(p.total.saturating_sub(p.errors));
                    @let err_h = scale(p.errors.min(p.total));
                    @if p.total > 0 {
                        rect.ok x=(x) y=(base - ok_h - err_h) width=(bar) height=(ok_h) {
                            title { (p.label) ": " (p.total) " requests, " (p.errors) " errors" }
                        }
                        rect.err x=(x) y=(base - err_h) width=(bar) height=(err_h) {}
                    }
                }
            }
        }
    }
}

/// p50 and p99 latency as two lines.
pub fn latency(title: &str, points: &[Latency]) -> Markup {
    let max = nice_max(points.iter().map(|p| p.p99.max(p.p50)).max().unwrap_or(0));
    let plot_w = W - LEFT - RIGHT;
    let base = H - BOTTOM;
    let n = points.len().max(1) as f64;
    let x = |i: usize| LEFT + plot_w * (i as f64 + 0.5) / n;
    let y = |v: u64| base - (base - TOP) * v as f64 / max as f64;
    let line = |pick: fn(&Latency) -> u64| {
        points
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{:.1},{:.1}", x(i), y(pick(p))))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let labels: Vec<&str> = points.iter().map(|p| p.label.as_str()).collect();
    html! {
        figure.chart {
            figcaption {
                (title)
                span.legend { span.sw.p50 {} "p50" span.sw.p99 {} "p99" }
            }
            svg viewBox={ "0 0 " (W) " " (H) } role="img" aria-label=(title) {
                (axes(max, &labels, "ms"))
                polyline.p99 points=(line(|p| p.p99)) {}
                polyline.p50 points=(line(|p| p.p50)) {}
                @for (i, p) in points.iter().enumerate() {
                    circle.p99 cx=(x(i)) cy=(y(p.p99)) r="2.5" {
                        title { (p.label) ": p50 " (p.p50) " ms, p99 " (p.p99) " ms" }
                    }
                    circle.p50 cx=(x(i)) cy=(y(p.p50)) r="2.5" {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_maximum_is_round() {
        assert_eq!(nice_max(0), 1);
        assert_eq!(nice_max(1), 1);
        assert_eq!(nice_max(3), 5);
        assert_eq!(nice_max(7), 10);
        assert_eq!(nice_max(101), 200);
        assert_eq!(nice_max(u64::MAX), u64::MAX);
        assert_eq!(
            (ticks(1), ticks(2), ticks(5), ticks(20), ticks(50)),
            (1, 2, 5, 5, 5)
        );
    }

    #[test]
    fn charts_render_empty_and_full() {
        let empty = counts("none", &[]).into_string();
        assert!(empty.contains("<svg"));
        let points = vec![
            Counts {
                label: "a".into(),
                total: 10,
                errors: 3,
            },
            Counts {
                label: "b<".into(),
                total: 0,
                errors: 0,
            },
        ];
        let svg = counts("c", &points).into_string();
        assert!(svg.contains("10 requests, 3 errors"));
        assert!(svg.contains("b&lt;"), "labels are escaped");
        let lat = latency(
            "l",
            &[Latency {
                label: "d".into(),
                p50: 5,
                p99: 40,
            }],
        )
        .into_string();
        assert!(lat.contains("polyline"));
    }
}
