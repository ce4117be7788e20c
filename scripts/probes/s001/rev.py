"""Probe (issue #19): the finiteness sum taken in reverse chunk order before the add, against the plain sum then add; ms, median.

Kept as run (results/cpu_checks/ holds its output); run from the repository root."""
import torch, time, statistics as st
torch.set_num_threads(2)
J=11173962
eps=torch.randn(J)*0.1
gs=[torch.randn(J) for _ in range(3)]
buf=torch.empty(J)
L=1<<20
def rev_sum(g):
    s=0.0
    parts=[g[i:i+L].sum() for i in range((J-1)//L*L, -1, -L)]
    return bool(torch.isfinite(torch.stack(parts).sum()))
res={"floor":[], "sum+add_":[], "revsum+add_":[]}
for i in range(30):
    g=gs[i%3]
    t0=time.perf_counter(); torch.mul(g,2,out=buf); res["floor"].append(time.perf_counter()-t0)
    g=gs[(i+1)%3]
    t0=time.perf_counter(); bool(torch.isfinite(g.sum())); eps.add_(g); res["sum+add_"].append(time.perf_counter()-t0)
    g=gs[(i+2)%3]
    t0=time.perf_counter(); rev_sum(g); eps.add_(g); res["revsum+add_"].append(time.perf_counter()-t0)
for k,v in res.items(): print(k, round(st.median(v[3:])*1e3,3))
