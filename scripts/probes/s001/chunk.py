"""Probe (issue #19): accumulating the gradient into the residual in 1-8 MB chunks with each chunk's block bounds right after it, against one add then the bounds; ms, median.

Kept as run (results/cpu_checks/ holds its output); run from the repository root."""
import torch, time, statistics as st
torch.set_num_threads(2)
J=11173962; C=64
eps=torch.randn(J)*0.1; gs=[torch.randn(J) for _ in range(3)]
def t(f,n=20):
    ts=[]
    for i in range(n):
        g=gs[i%3]
        t0=time.perf_counter();f(g);ts.append(time.perf_counter()-t0)
    return round(st.median(ts[2:])*1e3,3)
nb=J//C
def plain(g):
    s=bool(torch.isfinite(g.sum()))
    eps.add_(g); b=eps[:nb*C].view(nb,C); return b.amax(1), b.amin(1)
def chunked(g, L=1<<20):
    s=bool(torch.isfinite(g.sum()))
    mx=torch.empty(nb); mn=torch.empty(nb)
    bl=L//C
    for i in range(0, nb, bl):
        j=min(nb,i+bl)
        e=eps[i*C:j*C]; e.add_(g[i*C:j*C])
        v=e.view(-1,C); torch.amax(v,1,out=mx[i:j]); torch.amin(v,1,out=mn[i:j])
    eps[nb*C:].add_(g[nb*C:])
    return mx,mn
def chunked_sum(g, L=1<<20):
    mx=torch.empty(nb); mn=torch.empty(nb)
    bl=L//C
    for i in range(0, nb, bl):
        j=min(nb,i+bl)
        gg=g[i*C:j*C]; s=gg.sum()
        e=eps[i*C:j*C]; e.add_(gg)
        v=e.view(-1,C); torch.amax(v,1,out=mx[i:j]); torch.amin(v,1,out=mn[i:j])
    eps[nb*C:].add_(g[nb*C:])
    return mx,mn
buf=torch.empty(J)
print("floor", t(lambda g: torch.mul(g,2,out=buf)))
print("plain", t(plain))
for L in (1<<18, 1<<19, 1<<20, 1<<21):
    print("chunked",L, t(lambda g: chunked(g,L)), "chunked+sum", t(lambda g: chunked_sum(g,L)))
