//! The warp-wide tensor-core instructions as the PTX ISA defines them ("Matrix fragments for
//! mma.m16n8k16" and "ldmatrix"), on bf16 carried as 16-bit words. With g = lane / 4 and
//! t = lane % 4:
//! - `ldmatrix .m8n8 .x{1,2,4}`: lanes 8i … 8i+7 supply the addresses of rows 0 … 7 of matrix i
//!   (8 b16 values each); every lane receives, per matrix, the pair (row g, columns 2t, 2t+1),
//!   low half first; with `.trans` the pair of the transposed matrix.
//! - `mma.m16n8k16.row.col.f32.bf16.bf16.f32`: A 16×16 in 4 registers (a0: row g, a1: row g+8,
//!   a2: row g and a3: row g+8 at columns +8; each register columns 2t, 2t+1), B 16×8 in 2
//!   (b0: rows 2t, 2t+1; b1: rows 2t+8, 2t+9; column g), C and D 16×8 f32 in 4 (row g: columns 2t,
//!   2t+1; row g+8: the same).
//!
//! How tensor cores round inside an mma is not documented; the emulator accumulates in f32 in
//! k order starting from C (bf16 products are exact in f32), so a kernel is checked exactly against
//! a CPU reference in the same order, and against hardware within a tolerance.

use crate::element::Bf16;

/// Two bf16 values as one fragment register (low half: the first).
pub fn pack(lo: u16, hi: u16) -> u32 {
    lo as u32 | (hi as u32) << 16
}

fn halves(r: u32) -> [u16; 2] {
    [r as u16, (r >> 16) as u16]
}

/// `ldmatrix`: `matrices[i][row][col]`, the 8×8 b16 matrices the lanes' addresses name; returns
/// each lane's registers.
pub fn ldmatrix(matrices: &[[[u16; 8]; 8]], trans: bool) -> [[u32; 4]; 32] {
    let mut out = [[0u32; 4]; 32];
    for (lane, regs) in out.iter_mut().enumerate() {
        let (g, t) = (lane / 4, lane % 4);
        for (reg, m) in regs.iter_mut().zip(matrices) {
            let at = |row: usize, col: usize| if trans { m[col][row] } else { m[row][col] };
            *reg = pack(at(g, 2 * t), at(g, 2 * t + 1));
        }
    }
    out
}

/// `mma.sync.m16n8k16` from each lane's (a, b, c) registers; returns each lane's d.
pub fn mma_m16n8k16(lanes: &[([u32; 4], [u32; 2], [f32; 4]); 32]) -> [[f32; 4]; 32] {
    let (mut a, mut b, mut c) = ([[0.0f32; 16]; 16], [[0.0f32; 8]; 16], [[0.0f32; 8]; 16]);
    let bf = |h: u16| Bf16(h).to_f32();
    for (lane, (ra, rb, rc)) in lanes.iter().enumerate() {
        let (g, t) = (lane / 4, lane % 4);
        for (i, &r) in ra.iter().enumerate() {
            let (row, col) = (g + 8 * (i % 2), 2 * t + 8 * (i / 2));
            let [lo, hi] = halves(r);
            (a[row][col], a[row][col + 1]) = (bf(lo), bf(hi));
        }
        for (i, &r) in rb.iter().enumerate() {
            let k = 2 * t + 8 * i;
            let [lo, hi] = halves(r);
            (b[k][g], b[k + 1][g]) = (bf(lo), bf(hi));
        }
        for (i, &v) in rc.iter().enumerate() {
            c[g + 8 * (i / 2)][2 * t + i % 2] = v;
        }
    }
    let mut d = [[0.0f32; 4]; 32];
    for (lane, regs) in d.iter_mut().enumerate() {
        let (g, t) = (lane / 4, lane % 4);
        for (i, reg) in regs.iter_mut().enumerate() {
            let (row, col) = (g + 8 * (i / 2), 2 * t + i % 2);
            let mut acc = c[row][col];
            for k in 0..16 {
                acc += a[row][k] * b[k][col];
            }
            *reg = acc;
        }
    }
    d
}
