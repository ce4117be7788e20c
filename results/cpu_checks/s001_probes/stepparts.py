import torch, time
torch.set_num_threads(2)
J=11173962
g=torch.randn(1,J); eps=torch.randn(1,J)*0.1
buf=torch.empty_like(g)
def t(f,n=30):
    f();ts=[]
    for _ in range(n):
        t0=time.perf_counter();f();ts.append(time.perf_counter()-t0)
    return sorted(ts)[n//2]*1e3
fl=t(lambda: torch.mul(g,2,out=buf))
print("floor",fl)
for name,f in [("sum",lambda: bool(torch.isfinite(g.sum()))),("add_",lambda: eps.add_(g)),("add out",lambda: torch.add(eps,g,out=buf)),
  ("amax", lambda: g.view(-1,64).amax(1)), ("sum f64", lambda: g.sum(dtype=torch.float64)), ("dot", lambda: torch.dot(g[0], g[0]))]:
    x=t(f); print(name, round(x,3), round(x/fl,2))
