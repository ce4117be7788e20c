"""Probe (issue #19): the worker step (fedround.sparsify) at S = argv[1], part by part (finite sum, add, context, select, commit, uploads); ms and passes of the memory floor.

Kept as run (results/cpu_checks/ holds its output); run from the repository root."""
import sys, time, torch, statistics as st
sys.path.insert(0,"scripts")
import bench_sparsifiers as bs
from regtopk_fl.memory import ErrorFeedbackMemory
from regtopk_fl.fedround import sparsify, Upload
from regtopk_fl.compress import SPARSIFIERS
torch.set_num_threads(2)
S=float(sys.argv[1]); J=11173962
grads,a,ctx,others,cancel=bs.make_data(J,S,"cpu")
sp=SPARSIFIERS[sys.argv[2] if len(sys.argv)>2 else "topk"](S)
mem=ErrorFeedbackMemory(1,J); sparsify(mem,grads(0),sp,[bs.WEIGHT],round=0)
r=0; buf=torch.empty(1,J); g=grads(1); T={}; fl=[]
def tick(n,t0):
    t=time.perf_counter(); T.setdefault(n,[]).append(t-t0); return t
for i in range(20):
    mem.feedback_from_global(bs.global_gradient(mem,others,cancel),[bs.WEIGHT]); r+=1; gr=grads(r)
    t0=time.perf_counter(); torch.mul(g,2,out=buf); fl.append(time.perf_counter()-t0)
    t0=time.perf_counter(); ts=t0
    ok=bool(torch.isfinite(gr.sum())); t0=tick("finite sum",t0)
    a=mem.eps.add_(gr); t0=tick("add_",t0)
    ctx=mem.context([bs.WEIGHT],None,None,r) if getattr(sp,"needs_context",True) else None; t0=tick("context",t0)
    sel=sp.select(a,ctx); t0=tick("select",t0)
    values,local=mem.commit(a,sel,None); t0=tick("commit",t0)
    counts=sel.counts.tolist(); ups=[Upload(v,i,J) for v,i in zip(values.split_with_sizes(counts),local.split_with_sizes(counts))]; t0=tick("uploads",t0)
    T.setdefault("TOTAL",[]).append(t0-ts)
f=st.median(fl)
print("floor %.2f"%(f*1e3))
for n,v in T.items(): print("%-12s %.3f ms %.2f passes"%(n,st.median(v[3:])*1e3,st.median(v[3:])/f))
