"""Probe (issue #19, S = 0.01, J = 11,173,962, 2 threads): one reduction for both block bounds (aminmax) against amax + amin, per block length 64 and 128; ms, median.

Kept as run (results/cpu_checks/ holds its output); run from the repository root."""
import torch, time
torch.set_num_threads(2)
J=11173962
a=torch.randn(J)
for C in (64,128):
    B=J//C
    v=a[:B*C].view(B,C)
    def t(f,n=30):
        f();ts=[]
        for _ in range(n):
            t0=time.perf_counter();f();ts.append(time.perf_counter()-t0)
        return sorted(ts)[n//2]*1e3
    buf=torch.empty_like(a)
    print(C,"floor",t(lambda: torch.mul(a,2,out=buf)),"amax+amin",t(lambda:(v.amax(1),v.amin(1))),"aminmax",t(lambda: torch.aminmax(v,dim=1)), "amax",t(lambda: v.amax(1)))
