"""Probe (issue #19): the compiled scan's write pass with a branch per entry against the branchless block buffer, on the benchmark's S = 0.01 gradient; equality and ms.

Kept as run (results/cpu_checks/ holds its output); run from the repository root."""
import sys, time, statistics, torch, numpy as np
sys.path.insert(0, "scripts"); sys.path.insert(0, ".")
from bench_sparsifiers import make_data
from regtopk_fl.compress import exact_topk as E, scan_kernels as sk
from numba import njit, prange
import numba
torch.set_num_threads(2); numba.set_num_threads(2)
BLOCK=64
@njit(parallel=True)
def write_bl(x, t, absolute, counts, chunk, starts, pos, val):
    nb = counts.shape[0]
    for c in prange(starts.shape[0]):
        o = starts[c]
        bp = np.empty(BLOCK, np.int64); bv = np.empty(BLOCK, x.dtype)
        for b in range(c * chunk, min((c + 1) * chunk, nb)):
            cb = counts[b]
            if cb == 0:
                continue
            base = b * BLOCK
            n = 0
            for i in range(BLOCK):
                v = abs(x[base + i]) if absolute else x[base + i]
                bp[n] = base + i
                bv[n] = v
                n += 1 if v >= t else 0
            for j in range(cb):
                pos[o + j] = bp[j]; val[o + j] = bv[j]
            o += cb
def ms(fn, reps=30):
    fn(); ts=[]
    for _ in range(reps):
        t0=time.perf_counter(); fn(); ts.append(1e3*(time.perf_counter()-t0))
    return statistics.median(ts)
dim=11173962; S=0.01
_, acc, _, _, _ = make_data(dim, S, "cpu"); row=acc[0]; x=row.numpy()
k=round(S*dim); stride=E.sample_stride(dim); sample=row[::stride].abs(); m=sample.numel()
rank,hi_rank=E.sample_ranks(k,m,dim); t=float(torch.topk(sample,rank,sorted=True).values[rank-1]); tx=np.float32(t)
nb=dim//64
chunk=max(1,-(-nb//64)); counts=np.empty(nb,np.int32); totals=np.empty(-(-nb//chunk),np.int64)
sk._count(x,tx,True,counts,chunk,totals); starts=np.cumsum(totals)-totals; n=int(totals.sum())
pos=np.empty(n,np.int64); val=np.empty(n,np.float32); pos2=pos.copy(); val2=val.copy()
sk._write(x,tx,True,counts,chunk,starts,pos,val); write_bl(x,tx,True,counts,chunk,starts,pos2,val2)
print("eq", np.array_equal(pos,pos2), np.array_equal(val,val2))
for _ in range(2):
    print("write", ms(lambda: sk._write(x,tx,True,counts,chunk,starts,pos,val)), "branchless", ms(lambda: write_bl(x,tx,True,counts,chunk,starts,pos2,val2)))
