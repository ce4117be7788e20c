"""Probe (issue #19): a first numba sketch of the fused candidate scan (block counts, then positions) against torch's _candidates on the same row and t; ms, median.

Kept as run (results/cpu_checks/ holds its output); run from the repository root."""
import sys, time, statistics as st
sys.path.append("/tmp/nbsite")
import numpy as np, torch, numba
from numba import njit, prange
torch.set_num_threads(2); numba.set_num_threads(2)
sys.path.insert(0,"/work/main/scripts"); sys.path.insert(0,"/work/main")
import bench_sparsifiers as bs
from regtopk_fl.compress import exact_topk as ex

@njit(parallel=True, fastmath=True, cache=False)
def block_counts(x, t, C, cnt):
    nb = x.size // C
    for b in prange(nb):
        base = b * C
        m = np.float32(0.0)
        for i in range(C):
            v = abs(x[base + i])
            m = max(m, v)
        c = 0
        if m >= t:
            for i in range(C):
                c += abs(x[base + i]) >= t
        cnt[b] = c

@njit(parallel=True, cache=False)
def fill(x, t, C, starts, hit, idx, vals):
    for h in prange(hit.size):
        b = hit[h]; base = b * C; o = starts[h]
        for i in range(C):
            v = abs(x[base + i])
            if v >= t:
                idx[o] = base + i; vals[o] = v; o += 1

def scan(xn, t, C):
    nb = xn.size // C
    cnt = np.empty(nb, np.int32)
    block_counts(xn, np.float32(t), C, cnt)
    hit = np.flatnonzero(cnt)
    c = cnt[hit]
    starts = np.zeros(hit.size, np.int64); np.cumsum(c[:-1], out=starts[1:])
    total = int(starts[-1] + c[-1]) if hit.size else 0
    idx = np.empty(total, np.int64); vals = np.empty(total, np.float32)
    fill(xn, np.float32(t), C, starts, hit, idx, vals)
    return idx, vals

S=0.01; J=11173962
grads,a,ctx,others,cancel=bs.make_data(J,S,"cpu")
row=a[0]; k=round(S*J)
stride=ex.sample_stride(J); sample=row[::stride].abs(); m=sample.numel()
rank,hi_rank=ex.sample_ranks(k,m,J)
top=torch.topk(sample,rank,sorted=True).values; t=top[rank-1].item()
xn=row.numpy()
for C in (64,):
    idx,vals=scan(xn,t,C)
    lt,vt=ex._candidates(row,t,True,C)
    nb=J//C
    assert np.array_equal(idx, lt.numpy()[lt.numpy()<nb*C]), (idx.size, lt.numel())
    ts1=[];ts2=[]
    for _ in range(25):
        t0=time.perf_counter(); scan(xn,t,C); ts1.append(time.perf_counter()-t0)
        t0=time.perf_counter(); ex._candidates(row,t,True,C); ts2.append(time.perf_counter()-t0)
    buf=torch.empty_like(row); fl=[]
    for _ in range(20):
        t0=time.perf_counter(); torch.mul(row,2,out=buf); fl.append(time.perf_counter()-t0)
    print("floor %.2f  numba scan %.2f ms  torch _candidates %.2f ms  (cands %d)"%(st.median(fl)*1e3, st.median(ts1)*1e3, st.median(ts2)*1e3, idx.size))
nb=J//64; cnt=np.empty(nb,np.int32)
tt=np.float32(t)
def tm(f,n=25):
    f(); ts=[]
    for _ in range(n):
        t0=time.perf_counter(); f(); ts.append(time.perf_counter()-t0)
    return round(st.median(ts)*1e3,3)
print("block_counts", tm(lambda: block_counts(xn,tt,64,cnt)))
hit=np.flatnonzero(cnt); c=cnt[hit]
print("flatnonzero+cumsum", tm(lambda: (np.flatnonzero(cnt), np.cumsum(c))))
starts=np.zeros(hit.size,np.int64); np.cumsum(c[:-1],out=starts[1:]); total=int(starts[-1]+c[-1])
idx=np.empty(total,np.int64); vals=np.empty(total,np.float32)
print("fill", tm(lambda: fill(xn,tt,64,starts,hit,idx,vals)))
@njit(parallel=True, fastmath=True)
def bmax(x, C, out):
    nb = x.size // C
    for b in prange(nb):
        base=b*C; m=np.float32(0.0)
        for i in range(C):
            m = max(m, abs(x[base+i]))
        out[b]=m
mx=np.empty(nb,np.float32)
print("bmax only", tm(lambda: bmax(xn,64,mx)))
print("threads", numba.get_num_threads(), numba.threading_layer())
