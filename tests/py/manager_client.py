# A CPython SyncManager client exercising a (Rust) manager server.
# argv: host port authkey
import queue
import sys
from multiprocessing import AuthenticationError
from multiprocessing.managers import SyncManager, RemoteError

host, port, key = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
m = SyncManager(address=(host, port), authkey=key)
try:
    m.connect()
except AuthenticationError as e:
    print('AUTHFAIL', type(e).__name__, flush=True)
    sys.exit(0)

def check(cond, what):
    if not cond:
        print('FAIL', what, flush=True)
        sys.exit(1)

def raises(exc, f, what):
    try:
        f()
    except exc as e:
        return e
    print('FAIL no', exc.__name__, what, flush=True)
    sys.exit(1)

# dict
d = m.dict({'seed': 0}, extra=1)
d['a'] = 1
d['b'] = [1, 2, {'x': None}]
d[3] = b'bytes'
d[(1, 2)] = 2.5
check(d['a'] == 1 and d['b'] == [1, 2, {'x': None}] and d[3] == b'bytes', 'getitem')
check(d[(1, 2)] == 2.5, 'tuple key')
e = raises(KeyError, lambda: d['missing'], 'dict getitem')
check(e.args == ('missing',), 'KeyError args %r' % (e.args,))
check(len(d) == 6 and 'a' in d and 'zz' not in d, 'len/contains')
check(sorted(map(str, d.keys())) == sorted(['seed', 'extra', 'a', 'b', '3', '(1, 2)']), 'keys %r' % (d.keys(),))
check(d.keys() == ['seed', 'extra', 'a', 'b', 3, (1, 2)], 'insertion order %r' % (d.keys(),))
check(list(d) == d.keys(), 'iteration through #PROXY')
check(d.get('zz', 5) == 5 and d.get('a') == 1, 'get')
d['seed'] = 'updated'
check(d.keys()[0] == 'seed', 'update keeps the place')
check(d.pop('a') == 1 and d.pop('a', 'dflt') == 'dflt', 'pop')
d['a'] = 'again'
check(d.keys()[-1] == 'a' and d.popitem() == ('a', 'again'), 're-insert goes last; popitem is LIFO')
raises(KeyError, lambda: d.pop('a'), 'pop missing')
del d['b']
raises(KeyError, lambda: d.__delitem__('b'), 'del missing')
check(d.setdefault('s', 7) == 7 and d['s'] == 7, 'setdefault')
d.update({'u': 1}, v=2)
check(d['u'] == 1 and d['v'] == 2, 'update')
copy = d.copy()
check(isinstance(copy, dict) and copy['u'] == 1, 'copy')
check(str(d).startswith('{'), 'str fallback %r' % str(d))
d.clear()
check(len(d) == 0, 'clear')

# list
l = m.list([1, 2, 3])
l.append(4)
check(l[3] == 4 and l[-1] == 4 and len(l) == 4, 'list basics')
e = raises(IndexError, lambda: l[10], 'list getitem')
check('out of range' in str(e), 'IndexError text %r' % str(e))
raises(IndexError, lambda: l.__setitem__(10, 0), 'list setitem')
check(l.pop() == 4 and l.pop(0) == 1, 'pop')
l += [7, 8]
check(l._getvalue() == [2, 3, 7, 8], 'iadd %r' % l._getvalue())
check(l.index(7) == 2 and l.count(8) == 1 and 3 in l, 'index/count/contains')
raises(ValueError, lambda: l.index(99), 'index missing')
raises(ValueError, lambda: l.remove(99), 'remove missing')
l.insert(0, 9)
l.sort()
check(l._getvalue() == [2, 3, 7, 8, 9], 'sort')
l.reverse()
check(l[0] == 9, 'reverse')
raises(IndexError, lambda: m.list().pop(), 'pop empty')
check(l * 2 == [9, 8, 7, 3, 2] * 2, 'mul')

# Queue
q = m.Queue()
q.put('x')
q.put({'job': 1})
check(q.qsize() == 2 and not q.empty(), 'qsize')
check(q.get() == 'x' and q.get(timeout=1) == {'job': 1}, 'get')
raises(queue.Empty, q.get_nowait, 'get_nowait')
raises(queue.Empty, lambda: q.get(True, 0.05), 'get timeout')
bq = m.Queue(1)
bq.put(1)
raises(queue.Full, lambda: bq.put(2, False), 'put full')
jq = m.JoinableQueue()
jq.put(1)
jq.get()
jq.task_done()
jq.join()
raises(ValueError, jq.task_done, 'task_done too many')

# Value, Namespace
v = m.Value('i', 5)
v.value += 1
check(v.value == 6 and v.get() == 6, 'Value')
ns = m.Namespace(a=1)
ns.b = [2]
check(ns.a == 1 and ns.b == [2], 'Namespace')
raises(AttributeError, lambda: ns.c, 'Namespace missing')
del ns.a
raises(AttributeError, lambda: ns.a, 'Namespace deleted')

# Array
arr = m.Array('i', [1, 2, 3])
arr[0] = 10
check(len(arr) == 3 and arr[0] == 10 and arr[-1] == 3, 'Array')
raises(IndexError, lambda: arr[5], 'Array index')

# sync primitives
lock = m.Lock()
check(lock.acquire() and not lock.acquire(False), 'Lock')
lock.release()
raises(RemoteError if False else RuntimeError, lock.release, 'release unlocked')
rl = m.RLock()
check(rl.acquire() and rl.acquire(), 'RLock reentrant')
rl.release(); rl.release()
sem = m.Semaphore(2)
check(sem.acquire() and sem.acquire() and not sem.acquire(timeout=0.01), 'Semaphore')
ev = m.Event()
check(not ev.wait(0.01), 'Event wait timeout')
ev.set()
check(ev.is_set() and ev.wait(), 'Event')
cond = m.Condition()
cond.acquire()
check(cond.wait(0.01) is False, 'Condition wait timeout')
cond.notify_all()
cond.release()
bar = m.Barrier(1)
check(bar.wait() == 0 and bar.parties == 1, 'Barrier')

print('OK', flush=True)
m.shutdown() if False else None
