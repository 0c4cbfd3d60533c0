//! Eigenvalues of symmetric matrices, for singular value spectra: Householder reduction to
//! tridiagonal form, then each eigenvalue located by bisection on Sturm sequence counts. The
//! bisection is slower than an implicit QR sweep but simple, robust, and accurate to a few ulps
//! of the largest eigenvalue, which is all a spectrum plot needs.

/// Reduces the symmetric `n x n` row-major matrix `a` (overwritten) to tridiagonal form with the
/// same eigenvalues; returns `(diagonal, off-diagonal)` with `off[i]` coupling `i` and `i + 1`.
fn tridiagonalize(a: &mut [f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut off = vec![0.0; n.saturating_sub(1)];
    let mut v = vec![0.0; n];
    let mut p = vec![0.0; n];
    for k in 0..n.saturating_sub(2) {
        // Householder vector that zeroes column k below the subdiagonal.
        let m = n - k - 1;
        let col = |i: usize| a[(k + 1 + i) * n + k];
        let norm = (0..m).map(|i| col(i) * col(i)).sum::<f64>().sqrt();
        if norm == 0.0 {
            off[k] = 0.0;
            continue;
        }
        let alpha = if col(0) > 0.0 { -norm } else { norm };
        for (i, vi) in v[..m].iter_mut().enumerate() {
            *vi = col(i);
        }
        v[0] -= alpha;
        let vnorm = v[..m].iter().map(|x| x * x).sum::<f64>().sqrt();
        off[k] = alpha;
        if vnorm == 0.0 {
            continue;
        }
        for x in &mut v[..m] {
            *x /= vnorm;
        }
        // Trailing block B (rows/cols k+1..n): B <- H B H = B - 2 (v q^T + q v^T) with
        // p = B v, q = p - (v^T p) v.
        for i in 0..m {
            let row = &a[(k + 1 + i) * n + k + 1..(k + 1 + i) * n + n];
            p[i] = row.iter().zip(&v[..m]).map(|(x, y)| x * y).sum();
        }
        let kk: f64 = v[..m].iter().zip(&p[..m]).map(|(x, y)| x * y).sum();
        for i in 0..m {
            p[i] -= kk * v[i];
        }
        for i in 0..m {
            let (vi, qi) = (v[i], p[i]);
            let row = &mut a[(k + 1 + i) * n + k + 1..(k + 1 + i) * n + n];
            for (j, x) in row.iter_mut().enumerate() {
                *x -= 2.0 * (vi * p[j] + qi * v[j]);
            }
        }
    }
    let diag: Vec<f64> = (0..n).map(|i| a[i * n + i]).collect();
    if n >= 2 {
        off[n - 2] = a[(n - 1) * n + n - 2];
    }
    (diag, off)
}

/// Number of eigenvalues of the tridiagonal matrix (diag, off) below `x` (Sturm count).
fn count_below(diag: &[f64], off2: &[f64], x: f64, tiny: f64) -> usize {
    let mut count = 0;
    let mut q = 1.0f64;
    for (i, d) in diag.iter().enumerate() {
        let coupling = if i == 0 { 0.0 } else { off2[i - 1] / q };
        q = d - x - coupling;
        if q == 0.0 {
            q = -tiny;
        }
        if q < 0.0 {
            count += 1;
        }
    }
    count
}

/// Eigenvalues of the symmetric `n x n` row-major matrix `a` (consumed), ascending.
pub(crate) fn symmetric_eigenvalues(mut a: Vec<f64>, n: usize) -> Vec<f64> {
    assert_eq!(a.len(), n * n, "matrix must be n x n");
    if n == 0 {
        return Vec::new();
    }
    let (diag, off) = tridiagonalize(&mut a, n);
    let off2: Vec<f64> = off.iter().map(|e| e * e).collect();
    // Gershgorin bounds.
    let mut lo = f64::INFINITY;
    let mut hi = f64::NEG_INFINITY;
    for i in 0..n {
        let r = if i > 0 { off[i - 1].abs() } else { 0.0 } + off.get(i).map_or(0.0, |e| e.abs());
        lo = lo.min(diag[i] - r);
        hi = hi.max(diag[i] + r);
    }
    let scale = lo.abs().max(hi.abs()).max(f64::MIN_POSITIVE);
    let tol = scale * 4.0 * f64::EPSILON;
    let tiny = scale * f64::EPSILON * f64::EPSILON;
    (0..n)
        .map(|k| {
            // The (k+1)-th smallest: the point where the count passes k.
            let (mut a, mut b) = (lo - tol, hi + tol);
            while b - a > tol {
                let mid = 0.5 * (a + b);
                if mid <= a || mid >= b {
                    break;
                }
                if count_below(&diag, &off2, mid, tiny) > k {
                    b = mid;
                } else {
                    a = mid;
                }
            }
            0.5 * (a + b)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eigenvalues_of_known_matrices() {
        // diag(3, -1, 2) rotated by a Householder reflection keeps its eigenvalues.
        let d = [3.0, -1.0, 2.0];
        let u = [1.0 / 3f64.sqrt(); 3];
        let mut m = vec![0.0; 9];
        for i in 0..3 {
            for j in 0..3 {
                let hij = |i: usize, j: usize| (if i == j { 1.0 } else { 0.0 }) - 2.0 * u[i] * u[j];
                m[i * 3 + j] = (0..3).map(|k| hij(i, k) * d[k] * hij(k, j)).sum();
            }
        }
        let e = symmetric_eigenvalues(m, 3);
        for (got, want) in e.iter().zip([-1.0, 2.0, 3.0]) {
            assert!((got - want).abs() < 1e-12, "{e:?}");
        }
        // The path graph's Laplacian-like tridiagonal 2, -1 has eigenvalues 2 - 2 cos(k pi / (n+1)).
        let n = 40;
        let mut t = vec![0.0; n * n];
        for i in 0..n {
            t[i * n + i] = 2.0;
            if i + 1 < n {
                t[i * n + i + 1] = -1.0;
                t[(i + 1) * n + i] = -1.0;
            }
        }
        let e = symmetric_eigenvalues(t, n);
        for (k, got) in e.iter().enumerate() {
            let want = 2.0 - 2.0 * ((k + 1) as f64 * std::f64::consts::PI / (n + 1) as f64).cos();
            assert!((got - want).abs() < 1e-12, "{k}: {got} vs {want}");
        }
        assert!(symmetric_eigenvalues(vec![0.0; 4], 2)
            .iter()
            .all(|x| x.abs() < 1e-300));
    }
}
