//! EigenTrust (Kamvar, Schlosser, Garcia-Molina, WWW 2003), computed by each node over what
//! it knows: its own direct observations and the reports it holds.
//!
//! `t = (1 − a) · Cᵀ t + a · p`, where row `i` of `C` is node `i`'s normalised local trust
//! (satisfactory minus unsatisfactory observations, floored at 0), `p` is uniform over the
//! pre-trusted set (this node and its long-term peers) and `a` the teleport share. A row is
//! used only in proportion `keep_i` (the reporter's agreement with our own observations); the
//! rest of its mass, and the mass of nodes with no opinion, goes back to `p`. A node nobody
//! trusted ends with 0, however many identities vouch for each other, unless trust flows to
//! them from the pre-trusted set.

/// Global trust of each of `rows.len()` nodes (sums to 1).
pub(crate) fn global_trust(
    rows: &[Vec<(usize, f64)>],
    keep: &[f64],
    pre_trusted: &[usize],
    teleport: f64,
    iterations: usize,
) -> Vec<f64> {
    let n = rows.len();
    if n == 0 || pre_trusted.is_empty() {
        return vec![0.0; n];
    }
    let mut p = vec![0.0; n];
    let share = 1.0 / pre_trusted.len() as f64;
    for &i in pre_trusted {
        if i < n {
            p[i] += share;
        }
    }
    // Normalised rows, once.
    let normalised: Vec<Vec<(usize, f64)>> = rows
        .iter()
        .map(|row| {
            let sum: f64 = row.iter().map(|&(_, s)| s.max(0.0)).sum();
            if sum > 0.0 && sum.is_finite() {
                row.iter()
                    .filter(|&&(j, s)| j < n && s > 0.0)
                    .map(|&(j, s)| (j, s / sum))
                    .collect()
            } else {
                Vec::new()
            }
        })
        .collect();
    let mut t = p.clone();
    let mut next = vec![0.0; n];
    for _ in 0..iterations {
        next.iter_mut().for_each(|x| *x = 0.0);
        let mut back_to_p = 0.0;
        for (i, row) in normalised.iter().enumerate() {
            let ti = t[i];
            if ti == 0.0 {
                continue;
            }
            let k = if row.is_empty() {
                0.0
            } else {
                keep.get(i).copied().unwrap_or(1.0).clamp(0.0, 1.0)
            };
            for &(j, c) in row {
                next[j] += ti * k * c;
            }
            back_to_p += ti * (1.0 - k);
        }
        for j in 0..n {
            t[j] = (1.0 - teleport) * (next[j] + back_to_p * p[j]) + teleport * p[j];
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vouching_cliques_get_nothing_without_a_path_from_the_pre_trusted() {
        // 0 (self) trusts 1; 1 trusts 2; 3 and 4 vouch for each other only.
        let rows = vec![
            vec![(1, 10.0)],
            vec![(2, 5.0)],
            vec![(1, 1.0)],
            vec![(4, 100.0)],
            vec![(3, 100.0)],
        ];
        let t = global_trust(&rows, &[1.0; 5], &[0], 0.15, 30);
        assert!(t[1] > 0.1 && t[2] > 0.05, "{t:?}");
        assert!(t[3] < 1e-12 && t[4] < 1e-12, "{t:?}");
        assert!((t.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn a_discounted_row_passes_on_less() {
        let rows = vec![vec![(1, 1.0)], vec![(2, 1.0)], vec![]];
        let full = global_trust(&rows, &[1.0, 1.0, 1.0], &[0], 0.15, 30);
        let cut = global_trust(&rows, &[1.0, 0.1, 1.0], &[0], 0.15, 30);
        assert!(cut[2] < full[2] / 5.0, "{full:?} {cut:?}");
    }
}
