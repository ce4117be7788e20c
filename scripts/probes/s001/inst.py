"""Probe (issue #19): the exact Top-k selection of one row at S = argv[1], part by part (sample, block bounds, nonzero, gather, k-th value); ms and passes of the memory floor.

Kept as run (results/cpu_checks/ holds its output); run from the repository root."""
import sys, time, math, torch, statistics as st
sys.path.insert(0,"scripts")
import bench_sparsifiers as bs
from regtopk_fl.compress import exact_topk as ex
torch.set_num_threads(2)
S=float(sys.argv[1]); J=11173962
grads,a,ctx,others,cancel=bs.make_data(J,S,"cpu")
row=a[0]; k=max(1,round(S*J))
T={}
def tick(name,t0):
    t=time.perf_counter(); T.setdefault(name,[]).append(t-t0); return t
for it in range(25):
    t0=time.perf_counter(); tstart=t0
    stride=ex.sample_stride(J); sample=row[::stride].abs(); m=sample.numel()
    rank,hi_rank=ex.sample_ranks(k,m,J)
    top=torch.topk(sample,rank,sorted=True).values; t,hi=top[rank-1].item(),top[hi_rank-1].item()
    t0=tick("sample",t0)
    block=ex._block_size(rank/m); nb=J//block; body=row[:nb*block].view(nb,block)
    reach=body.amax(dim=1)>=t; reach|=body.amin(dim=1)<=-t
    t0=tick("bounds",t0)
    hit=torch.nonzero(reach).squeeze(1)
    t0=tick("hit nonzero",t0)
    blk=ex._scratch_like(row,hit.numel()*block); torch.index_select(body,0,hit,out=blk.view(-1,block)); blk.abs_()
    t0=tick("copy+abs",t0)
    msk=torch.ge(blk,t,out=ex._scratch_like(row,blk.numel(),torch.bool))
    t0=tick("ge",t0)
    pos=torch.nonzero(msk).squeeze(1)
    t0=tick("cand nonzero",t0)
    shift=block.bit_length()-1
    local=(hit.index_select(0,pos>>shift)<<shift)|(pos&(block-1))
    t0=tick("local arith",t0)
    vals=blk.index_select(0,pos)
    t0=tick("vals gather",t0)
    kth=ex._kth_below(vals,k,hi)
    t0=tick("kth_below",t0)
    p2=torch.nonzero(vals>=kth).squeeze(1)
    t0=tick("final nonzero",t0)
    out=local.index_select(0,p2)
    t0=tick("final gather",t0)
    T.setdefault("TOTAL",[]).append(time.perf_counter()-tstart)
    t0=time.perf_counter(); ex._row_topk(row,k,True); tick("real _row_topk",t0)
buf=torch.empty_like(a); fl=[]
for _ in range(20):
    t0=time.perf_counter(); torch.mul(a,2,out=buf); fl.append(time.perf_counter()-t0)
f=st.median(fl)
print("floor %.2f ms; candidates %d hit blocks %d (%.1f%% J)"%(f*1e3,pos.numel(),hit.numel(),100*hit.numel()*block/J))
for n,v in T.items(): print("%-16s %.3f ms %.2f passes"%(n,st.median(v[3:])*1e3,st.median(v[3:])/f))
