"""Probe (issue #19): block bounds as reductions over the inner or a middle dimension (tile shapes), per block length 64 and 128; ms, median.

Kept as run (results/cpu_checks/ holds its output); run from the repository root."""
import torch, time, statistics as st
torch.set_num_threads(2)
J=11173962; a=torch.randn(J)
def t(f,n=25):
    f();ts=[]
    for i in range(n):
        t0=time.perf_counter();f();ts.append(time.perf_counter()-t0)
    return round(st.median(ts)*1e3,3)
buf=torch.empty(J)
print("floor", t(lambda: torch.mul(a,2,out=buf)))
for C in (64,128):
    nb=J//C; v=a[:nb*C].view(nb,C)
    print(C,"inner amax", t(lambda: v.amax(1)), "amax+amin", t(lambda: (v.amax(1), v.amin(1))))
    for W in (8,16,32):
        R=C//W; v3=a[:nb*C].view(nb,R,W)
        print(C,W,"mid amax", t(lambda: v3.amax(1)), "mid amax+amin->bound", t(lambda: torch.maximum(v3.amax(1), v3.amin(1).neg_()).amax(1)))
    # outer: [R, nb*W]? reduce dim0 over a strided view
