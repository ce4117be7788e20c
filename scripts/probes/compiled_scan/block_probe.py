"""Probe (issue #19): the compiled count and write kernels with block length B (env, e.g. 16-128) on the benchmark's gradient at each S: share of the row in hit blocks and each pass's median ms (why scan_kernels.BLOCK = 64).

Kept as run (results/cpu_checks/ holds its output); run from the repository root."""
import sys, os, time, statistics, torch, numpy as np
sys.path.insert(0, "scripts"); sys.path.insert(0, ".")
from bench_sparsifiers import make_data
from regtopk_fl.compress import exact_topk as E
from numba import njit, prange
import numba
torch.set_num_threads(2); numba.set_num_threads(2)
BLOCK=int(os.environ["B"])
@njit(parallel=True)
def count(x, t, absolute, counts, chunk, totals):
    nb = counts.shape[0]
    for c in prange(totals.shape[0]):
        tot = 0
        for b in range(c * chunk, min((c + 1) * chunk, nb)):
            s = x[b * BLOCK:(b + 1) * BLOCK]
            n = np.int32(0)
            if absolute:
                for i in range(BLOCK):
                    n += np.int32(1) if abs(s[i]) >= t else np.int32(0)
            else:
                for i in range(BLOCK):
                    n += np.int32(1) if s[i] >= t else np.int32(0)
            counts[b] = n
            tot += n
        totals[c] = tot
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
dim=11173962
for S in (0.01, 0.001, 0.0001):
    _, acc, _, _, _ = make_data(dim, S, "cpu"); row=acc[0]; x=row.numpy()
    k=round(S*dim); stride=E.sample_stride(dim); sample=row[::stride].abs(); m=sample.numel()
    rank,hi_rank=E.sample_ranks(k,m,dim); t=float(torch.topk(sample,rank,sorted=True).values[rank-1]); tx=np.float32(t)
    nb=dim//BLOCK
    chunk=max(1,-(-nb//64)); counts=np.empty(nb,np.int32); totals=np.empty(-(-nb//chunk),np.int64)
    count(x,tx,True,counts,chunk,totals); starts=np.cumsum(totals)-totals; n=int(totals.sum())
    pos=np.empty(n,np.int64); val=np.empty(n,np.float32)
    write_bl(x,tx,True,counts,chunk,starts,pos,val)
    lt,vt=E._candidates_torch(row,t,True,64)
    print(BLOCK, S, np.array_equal(pos, lt.numpy()), "hit%", round(100*np.count_nonzero(counts)/nb,1), "count", round(ms(lambda: count(x,tx,True,counts,chunk,totals)),3), "write", round(ms(lambda: write_bl(x,tx,True,counts,chunk,starts,pos,val)),3))
