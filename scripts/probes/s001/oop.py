"""Probe (issue #19): the finiteness sum plus the in-place add eps += g against an out-of-place add into a second buffer; ms, median.

Kept as run (results/cpu_checks/ holds its output); run from the repository root."""
import torch, time, statistics as st
torch.set_num_threads(2)
J=11173962
eps=torch.randn(J)*0.1; spare=torch.empty(J); spare.zero_()
gs=[torch.randn(J) for _ in range(3)]
buf=torch.empty(J)
res={"floor":[], "sum+add_":[], "add out":[]}
for i in range(30):
    g=gs[i%3]
    t0=time.perf_counter(); torch.mul(g,2,out=buf); res["floor"].append(time.perf_counter()-t0)
    g=gs[(i+1)%3]
    t0=time.perf_counter(); bool(torch.isfinite(g.sum())); eps.add_(g); res["sum+add_"].append(time.perf_counter()-t0)
    g=gs[(i+2)%3]
    t0=time.perf_counter(); torch.add(eps,g,out=spare); eps,spare=spare,eps; res["add out"].append(time.perf_counter()-t0)
for k,v in res.items(): print(k, round(st.median(v[3:])*1e3,3))
