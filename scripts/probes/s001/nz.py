"""Probe (issue #19): finding the candidates in 2.08M bools: nonzero, nonzero_static, masked_select, where, numpy, a two-level nonzero over words; 1 and 2 threads; ms.

Kept as run (results/cpu_checks/ holds its output); run from the repository root."""
import torch, time
def t(f,n=40):
    f();ts=[]
    for _ in range(n):
        t0=time.perf_counter();f();ts.append(time.perf_counter()-t0)
    return round(sorted(ts)[n//2]*1e3,3)
N=2080000
m=torch.rand(N)<0.06
M=int(m.sum())
for th in (1,2):
    torch.set_num_threads(th)
    print(th,"nonzero",t(lambda: torch.nonzero(m)),"static",t(lambda: torch.nonzero_static(m,size=M)),
          "masked_select",t(lambda: torch.masked_select(torch.arange(N),m)), "where", t(lambda: torch.where(m)))
    w=m.view(torch.int64)
    def words():
        nzw=torch.nonzero(w!=0).squeeze(1)
        b=w.index_select(0,nzw).view(torch.uint8).view(-1,8)
        rc=torch.nonzero(b)
        return nzw.index_select(0,rc[:,0])*8+rc[:,1]
    r=words(); assert torch.equal(r, torch.nonzero(m).squeeze(1))
    print(th,"words",t(words))
import numpy as np
mn=m.numpy()
print("np.flatnonzero",t(lambda: np.flatnonzero(mn)), "np.nonzero", t(lambda: np.nonzero(mn)))
bf=torch.rand(N); bn=bf.numpy()
print("np ge+flatnonzero",t(lambda: np.flatnonzero(bn>=0.94)))
