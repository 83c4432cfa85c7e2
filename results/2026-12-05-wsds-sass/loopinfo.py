import re,sys
f=sys.argv[1]
lines=open(f).read().splitlines()
ins=[];labels={}
pend=[]
for l in lines:
    m=re.match(r'^(\.L\w+):',l)
    if m: pend.append(m.group(1)); continue
    m=re.match(r'\s*/\*([0-9a-f]{4,})\*/\s+(.*?);',l)
    if m:
        a=int(m.group(1),16)
        for p in pend: labels[p]=a
        pend=[]
        ins.append((a,m.group(2).strip()))
best=None
for a,t in ins:
    m=re.search(r'BRA `\((\.L\w+)\)',t)
    if m and labels.get(m.group(1),1<<40)<=a:
        lo=labels[m.group(1)]
        body=[x for x in ins if lo<=x[0]<=a]
        n=sum('HGMMA' in x[1] for x in body)
        if n and (best is None or len(body)>len(best[2])): best=(lo,a,body)
lo,hi,body=best
body=[x for x in body if not x[1].startswith('NOP')]
print(f'loop {lo:#x}-{hi:#x}: {len(body)} instrs')
for i,(a,t) in enumerate(body):
    if any(k in t for k in ('DEPBAR','SYNCS.ARRIVE','BAR.SYNC','BAR.ARV','HGMMA','WARPGROUP.ARRIVE')) :
        print(i, re.sub(r'\s+',' ',t)[:70])
