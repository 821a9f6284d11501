//! Hilbert-curve keys and order (a port of `residual_gpu/hilbert.py`).
//!
//! Coordinates (already scaled by 1/lengthscale) are quantised to `bits` bits per dimension
//! on a fixed box: `cell = floor((x - lo) / width * 2^bits)`, clamped to `[0, 2^bits - 1]`
//! (0 where the box has no width). Skilling's AxesToTranspose turns the cells into the
//! transposed Hilbert index, whose bits are interleaved from the most significant bit,
//! dimension 0 first. `bits = min(16, 62 / d)` keeps the key a non-negative i64.
//! The order sorts by key stably, so equal keys keep their input order.

/// Bits per dimension of a key for d-dimensional points.
pub fn key_bits(d: usize) -> u32 {
    (62 / d.max(1)).clamp(1, 16) as u32
}

/// Skilling's AxesToTranspose on `cells` (modified in place), then bit interleaving.
fn transpose_key(cells: &mut [i64], bits: u32) -> i64 {
    let n = cells.len();
    let top: i64 = 1 << (bits - 1);
    let mut q = top;
    while q > 1 {
        let p = q - 1;
        for i in 0..n {
            if cells[i] & q != 0 {
                cells[0] ^= p;
            } else {
                let t = (cells[0] ^ cells[i]) & p;
                cells[0] ^= t;
                cells[i] ^= t;
            }
        }
        q >>= 1;
    }
    for i in 1..n {
        cells[i] ^= cells[i - 1];
    }
    let mut t: i64 = 0;
    q = top;
    while q > 1 {
        if cells[n - 1] & q != 0 {
            t ^= q - 1;
        }
        q >>= 1;
    }
    for c in cells.iter_mut() {
        *c ^= t;
    }
    let mut key: i64 = 0;
    for b in (0..bits).rev() {
        for c in cells.iter() {
            key = (key << 1) | ((c >> b) & 1);
        }
    }
    key
}

/// Hilbert key of one point `x` (length d >= 1) on the box `[lo, lo + width]`.
pub fn hilbert_key(x: &[f64], lo: &[f64], width: &[f64], bits: u32, cells: &mut Vec<i64>) -> i64 {
    let d = x.len();
    assert!(d >= 1, "hilbert_key: points need at least one coordinate");
    let top: i64 = (1i64 << bits) - 1;
    cells.clear();
    for t in 0..d {
        // same float operations as hilbert.py: (x - lo) / width * (top + 1)
        let c = if width[t] <= 0.0 {
            0.0
        } else {
            (x[t] - lo[t]) / width[t] * ((top + 1) as f64)
        };
        let ci = if c > 0.0 { c as i64 } else { 0 };
        cells.push(top.min(ci));
    }
    transpose_key(cells, bits)
}

/// Keys of the rows of `x` (row-major, `d` columns) on the box `[lo, hi]`.
pub fn hilbert_keys(x: &[f64], d: usize, lo: &[f64], hi: &[f64]) -> Vec<i64> {
    let bits = key_bits(d);
    let width: Vec<f64> = hi.iter().zip(lo).map(|(h, l)| h - l).collect();
    let mut cells = Vec::with_capacity(d);
    x.chunks_exact(d)
        .map(|row| hilbert_key(row, lo, &width, bits, &mut cells))
        .collect()
}

/// Row order along the Hilbert curve; equal keys keep their row order (stable sort).
pub fn hilbert_order(x: &[f64], d: usize, lo: &[f64], hi: &[f64]) -> Vec<usize> {
    let keys = hilbert_keys(x, d, lo, hi);
    let mut order: Vec<usize> = (0..keys.len()).collect();
    order.sort_by_key(|&r| keys[r]); // stable
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::SplitMix64;

    #[test]
    fn key_bits_fit_in_i64() {
        assert_eq!(key_bits(1), 16);
        assert_eq!(key_bits(3), 16);
        assert_eq!(key_bits(4), 15);
        assert_eq!(key_bits(8), 7);
        assert_eq!(key_bits(62), 1);
        assert_eq!(key_bits(100), 1);
        for d in 1..70 {
            assert!(key_bits(d) as usize * d <= 62 || key_bits(d) == 1);
        }
    }

    /// In 2-D with 2 bits the curve visits the 16 cells in the classic order, each once,
    /// and consecutive cells are grid neighbours.
    #[test]
    fn two_d_curve_is_a_hamiltonian_path_of_neighbours() {
        for bits in 1..=5u32 {
            let side = 1i64 << bits;
            let mut by_key = vec![(-1i64, -1i64); (side * side) as usize];
            let mut cells = Vec::new();
            for cx in 0..side {
                for cy in 0..side {
                    cells.clear();
                    cells.extend([cx, cy]);
                    let key = transpose_key(&mut cells, bits);
                    assert!(key >= 0 && key < side * side);
                    assert_eq!(by_key[key as usize], (-1, -1), "key {key} twice");
                    by_key[key as usize] = (cx, cy);
                }
            }
            for w in by_key.windows(2) {
                let step = (w[0].0 - w[1].0).abs() + (w[0].1 - w[1].1).abs();
                assert_eq!(step, 1, "bits {bits}: {:?} -> {:?}", w[0], w[1]);
            }
            // the curve starts at the origin
            assert_eq!(by_key[0], (0, 0));
        }
    }

    #[test]
    fn three_d_keys_are_a_bijection_with_unit_steps() {
        let bits = 3u32;
        let side = 1i64 << bits;
        let total = (side * side * side) as usize;
        let mut by_key = vec![None; total];
        let mut cells = Vec::new();
        for a in 0..side {
            for b in 0..side {
                for c in 0..side {
                    cells.clear();
                    cells.extend([a, b, c]);
                    let key = transpose_key(&mut cells, bits) as usize;
                    assert!(by_key[key].is_none());
                    by_key[key] = Some([a, b, c]);
                }
            }
        }
        let pts: Vec<[i64; 3]> = by_key.into_iter().map(|p| p.unwrap()).collect();
        for w in pts.windows(2) {
            let step: i64 = (0..3).map(|t| (w[0][t] - w[1][t]).abs()).sum();
            assert_eq!(step, 1);
        }
    }

    #[test]
    fn quantisation_clamps_and_order_is_stable() {
        let lo = [0.0, 0.0];
        let hi = [1.0, 2.0];
        // points outside the box clamp to the border cells; equal points tie
        let x = [
            0.5, 1.0, //
            -3.0, -3.0, //
            0.5, 1.0, //
            9.0, 9.0, //
            0.0, 0.0, //
        ];
        let keys = hilbert_keys(&x, 2, &lo, &hi);
        assert_eq!(keys[0], keys[2]);
        assert_eq!(keys[1], keys[4]); // clamped to cell (0, 0)
        assert_eq!(keys[1], 0);
        let order = hilbert_order(&x, 2, &lo, &hi);
        // ties keep the input order
        let p1 = order.iter().position(|&r| r == 1).unwrap();
        let p4 = order.iter().position(|&r| r == 4).unwrap();
        assert!(p1 < p4);
        let p0 = order.iter().position(|&r| r == 0).unwrap();
        let p2 = order.iter().position(|&r| r == 2).unwrap();
        assert!(p0 < p2);
        // a box of zero width puts everything in cell 0
        let keys = hilbert_keys(&[3.0, 4.0, 5.0], 1, &[3.0], &[3.0]);
        assert_eq!(keys, vec![0, 0, 0]);
    }

    #[test]
    fn order_is_spatially_local() {
        // consecutive points along the order are much closer than random pairs
        let mut rng = SplitMix64::new(4);
        let n = 2000;
        let x: Vec<f64> = (0..2 * n).map(|_| rng.uniform()).collect();
        let order = hilbert_order(&x, 2, &[0.0, 0.0], &[1.0, 1.0]);
        let mut seen = order.clone();
        seen.sort();
        assert_eq!(seen, (0..n).collect::<Vec<_>>());
        let dist = |a: usize, b: usize| {
            ((x[2 * a] - x[2 * b]).powi(2) + (x[2 * a + 1] - x[2 * b + 1]).powi(2)).sqrt()
        };
        let along: f64 = order.windows(2).map(|w| dist(w[0], w[1])).sum::<f64>() / n as f64;
        let random: f64 = (1..n).map(|a| dist(a - 1, a)).sum::<f64>() / n as f64;
        assert!(along < random / 10.0, "along {along} random {random}");
    }
}
