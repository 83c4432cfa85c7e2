import re,sys
lines=open(sys.argv[1]).read().splitlines()
ins=[]
for l in lines:
    m=re.match(r'\s*/\*([0-9a-f]{4,})\*/\s+(.*?);',l)
    if m: ins.append((int(m.group(1),16),m.group(2).strip()))
labels={}
for i,l in enumerate(lines):
    m=re.match(r'^(\.L\w+):',l)
    if m:
        # next instruction address
        for l2 in lines[i+1:]:
            mm=re.match(r'\s*/\*([0-9a-f]{4,})\*/',l2)
            if mm: labels[m.group(1)]=int(mm.group(1),16);break
for a,t in ins:
    if 'BRA' in t:
        m=re.search(r'`\((\.L\w+)\)',t)
        if m and labels.get(m.group(1),1<<40)<=a:
            print(hex(labels[m.group(1)]),'<-',hex(a),t)
