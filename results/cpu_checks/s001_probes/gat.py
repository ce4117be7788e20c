import torch, time
torch.set_num_threads(2)
def t(f,n=50):
    f();ts=[]
    for _ in range(n):
        t0=time.perf_counter();f();ts.append(time.perf_counter()-t0)
    return round(sorted(ts)[n//2]*1e3,3)
nh=40405; C=64
hit=torch.sort(torch.randperm(174593)[:nh]).values
mask=torch.rand(nh*C)<0.047
pos=torch.nonzero(mask).squeeze(1)
print("M",pos.numel())
print("nonzero 1d",t(lambda: torch.nonzero(mask)))
print("nonzero 2d",t(lambda: torch.nonzero(mask.view(nh,C))))
print("nonzero as_tuple 2d",t(lambda: torch.nonzero(mask.view(nh,C),as_tuple=True)))
print("shift", t(lambda: pos>>6), "div", t(lambda: torch.div(pos,64,rounding_mode='floor')), "and", t(lambda: pos&63))
q=pos>>6
print("index_select",t(lambda: hit.index_select(0,q)),"adv",t(lambda: hit[q]),"take",t(lambda: torch.take(hit,q)),"gather",t(lambda: torch.gather(hit,0,q)))
print("full old", t(lambda: (hit.index_select(0, pos >> 6) << 6) | (pos & 63)))
off=(hit - torch.arange(nh))*64
print("off", t(lambda: pos + off.index_select(0,pos>>6)))
p32=pos.to(torch.int32)
print("to32",t(lambda: pos.to(torch.int32)), "shift32", t(lambda: p32>>6))
print("mul", t(lambda: pos*64), "add", t(lambda: pos+pos), "add_", t(lambda: pos.add_(0)))
print("repeat_interleave counts", t(lambda: mask.view(nh,C).sum(1)))
