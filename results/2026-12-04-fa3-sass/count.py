import re,sys,collections
f,lo,hi=sys.argv[1],int(sys.argv[2],16),int(sys.argv[3],16)
skip=[(int(a,16),int(b,16)) for a,b in (x.split('-') for x in sys.argv[4:])]
c=collections.Counter();n=0
for l in open(f):
    m=re.match(r'\s*/\*([0-9a-f]{4,})\*/\s+(.*?);',l)
    if not m: continue
    a=int(m.group(1),16)
    if not(lo<=a<=hi) or any(s<=a<=e for s,e in skip): continue
    t=m.group(2).strip()
    t=re.sub(r'^@!?U?P\w+\s+','',t)
    op=t.split()[0]
    if op=='NOP': continue
    n+=1
    base=op
    if op.startswith('HGMMA'): base=op+(' RS' if re.search(r'HGMMA\S+ R\d+, R\d+',t) else ' SS')
    c[base]+=1
print('total(non-NOP)',n)
for k,v in sorted(c.items(),key=lambda x:-x[1]): print(f'{v:5d} {k}')
