# Issue 13's scenarios: an unmodified CPython 3.11 SyncManager program, run against a
# manager server (ours or CPython's own), printing one `name: PASS|FAIL detail` line per
# scenario and a final `passed: N/M`.
#
#   python3 manager_scenarios.py client HOST PORT AUTHKEY   run the scenarios
#   python3 manager_scenarios.py serve AUTHKEY              CPython's own server (prints
#                                                           `serving on HOST:PORT`)
import array
import multiprocessing
import sys
import threading
import time
import traceback
from multiprocessing.managers import (BaseProxy, MakeProxyType, RemoteError,
                                      SyncManager)

# CPython 3.14's SyncManager.set, registered by hand as 3.14 does it.
_BaseSetProxy = MakeProxyType('_BaseSetProxy', (
    '__and__', '__contains__', '__iand__', '__ior__', '__isub__', '__iter__',
    '__ixor__', '__len__', '__or__', '__rand__', '__ror__', '__rsub__', '__rxor__',
    '__sub__', '__xor__', '__ge__', '__gt__', '__le__', '__lt__', 'add', 'clear',
    'copy', 'difference', 'difference_update', 'discard', 'intersection',
    'intersection_update', 'isdisjoint', 'issubset', 'issuperset', 'pop', 'remove',
    'symmetric_difference', 'symmetric_difference_update', 'union', 'update'))


class SetProxy(_BaseSetProxy):
    def __ior__(self, value):
        self._callmethod('__ior__', (value,))
        return self

    def __iand__(self, value):
        self._callmethod('__iand__', (value,))
        return self

    def __ixor__(self, value):
        self._callmethod('__ixor__', (value,))
        return self

    def __isub__(self, value):
        self._callmethod('__isub__', (value,))
        return self


SetProxy._method_to_typeid_ = {'__iter__': 'Iterator'}
SyncManager.register('set', set, SetProxy)

LONG = 20


def serve(key):
    multiprocessing.current_process().authkey = key
    m = SyncManager(address=('127.0.0.1', 0), authkey=key)
    server = m.get_server()
    print('serving on %s:%d' % server.address, flush=True)
    server.serve_forever()


RESULTS = []


def scenario(fn):
    name = fn.__name__
    try:
        detail = fn()
        ok = True
    except AssertionError as e:
        ok, detail = False, 'assert %s' % (e,)
    except Exception as e:
        ok, detail = False, '%s: %s' % (type(e).__name__, last_line(e))
    RESULTS.append(ok)
    print('%s: %s %s' % (name, 'PASS' if ok else 'FAIL', detail or ''), flush=True)
    return fn


def last_line(e):
    lines = [x for x in str(e).splitlines() if x.strip() and not x.startswith('---')]
    return lines[-1] if lines else ''


def raises(exc, f):
    try:
        f()
    except exc as e:
        return e
    raise AssertionError('no %s' % exc.__name__)


def wait_until(cond, what):
    deadline = time.monotonic() + LONG
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError('timed out waiting for %s' % what)
        time.sleep(0.01)


def run(m):
    @scenario
    def slice_get():
        lst = m.list(range(10))
        assert lst[:] == list(range(10)), lst[:]
        assert lst[2:5] == [2, 3, 4], lst[2:5]
        assert lst[::2] == [0, 2, 4, 6, 8]
        assert lst[-3:] == [7, 8, 9] and lst[::-3] == [9, 6, 3, 0]

    @scenario
    def slice_del():
        lst = m.list(range(6))
        del lst[1:3]
        assert lst[:] == [0, 3, 4, 5], lst[:]
        del lst[::2]
        assert lst[:] == [3, 5], lst[:]

    @scenario
    def slice_set():
        lst = m.list(range(6))
        lst[1:3] = ['a', 'b', 'c']
        assert lst[:] == [0, 'a', 'b', 'c', 3, 4, 5], lst[:]
        lst[::2] = [9, 9, 9, 9]
        assert lst[:] == [9, 'a', 9, 'c', 9, 4, 9], lst[:]
        raises(ValueError, lambda: lst.__setitem__(slice(None, None, 2), [1]))

    @scenario
    def nested_lists():
        outer = m.list([m.list(range(3)) for _ in range(3)])
        outer[0].append(9)
        assert outer[0][:] == [0, 1, 2, 9], outer[0][:]
        assert outer[1][:] == [0, 1, 2]
        assert len(outer) == 3 and isinstance(outer[2], BaseProxy)

    @scenario
    def queue_in_dict():
        d = m.dict()
        d['q'] = m.Queue()
        d['q'].put('job')
        assert d['q'].get(timeout=LONG) == 'job'

    @scenario
    def dict_in_dict():
        d = m.dict()
        d['inner'] = m.dict(a=1)
        d['inner']['x'] = 2
        inner = d['inner']
        assert inner['x'] == 2 and inner['a'] == 1 and len(inner) == 2

    @scenario
    def queue_in_queue():
        q = m.Queue()
        q.put(m.Queue())
        inner = q.get(timeout=LONG)
        inner.put(5)
        assert inner.get(timeout=LONG) == 5

    @scenario
    def nested_survives_its_creator():
        outer = m.dict()
        outer['l'] = m.list([1])
        import gc
        gc.collect()
        outer['l'].append(2)
        assert outer['l'][:] == [1, 2]

    @scenario
    def forked_child_gets_proxies():
        ctx = multiprocessing.get_context('fork')
        lst = m.list([1])
        d = m.dict()
        d['q'] = m.Queue()
        d['nested'] = m.list([0])
        q = m.Queue()
        p = ctx.Process(target=_child, args=(lst, d, q))
        p.start()
        got = q.get(timeout=LONG)
        p.join(LONG)
        assert p.exitcode == 0, p.exitcode
        assert got == 'child done', got
        assert lst[:] == [1, 'child'], lst[:]
        assert d['from_child'] == 42
        assert d['q'].get(timeout=LONG) == 'via nested queue'
        assert d['nested'][:] == [0, 'child'], d['nested'][:]

    @scenario
    def barrier_attributes():
        b = m.Barrier(3)
        assert b.parties == 3 and b.n_waiting == 0 and b.broken is False

    @scenario
    def barrier_passes():
        b = m.Barrier(2)
        out = []
        t = threading.Thread(target=lambda: out.append(b.wait(timeout=LONG)))
        t.start()
        me = b.wait(timeout=LONG)
        t.join(LONG)
        assert sorted(out + [me]) == [0, 1], out + [me]

    @scenario
    def barrier_reset_wakes_waiters():
        b = m.Barrier(3)
        errors = []

        def waiter():
            try:
                b.wait(timeout=LONG)
            except Exception as e:
                errors.append(type(e).__name__)
        ts = [threading.Thread(target=waiter) for _ in range(2)]
        for t in ts:
            t.start()
        wait_until(lambda: b.n_waiting == 2, 'two waiters')
        b.reset()
        for t in ts:
            t.join(LONG)
        assert errors == ['BrokenBarrierError'] * 2, errors
        assert b.broken is False and b.n_waiting == 0
        out = []
        ts = [threading.Thread(target=lambda: out.append(b.wait(timeout=LONG))) for _ in range(2)]
        for t in ts:
            t.start()
        b.wait(timeout=LONG)
        for t in ts:
            t.join(LONG)
        assert len(out) == 2, 'usable after reset'

    @scenario
    def barrier_abort():
        b = m.Barrier(2)
        b.abort()
        assert b.broken is True
        raises(threading.BrokenBarrierError, lambda: b.wait(timeout=LONG))

    @scenario
    def barrier_timeout_breaks():
        b = m.Barrier(2)
        raises(threading.BrokenBarrierError, lambda: b.wait(timeout=0.05))
        assert b.broken is True

    @scenario
    def dict_iteration_while_changing():
        d = m.dict({1: 1, 2: 2})
        it = iter(d)
        assert next(it) == 1
        d[3] = 3
        raises(RuntimeError, lambda: next(it))

    @scenario
    def dict_iteration():
        d = m.dict({'a': 1, 'b': 2})
        assert list(d) == ['a', 'b'] and list(d.items()) == [('a', 1), ('b', 2)]

    @scenario
    def namespace_str_repr():
        ns = m.Namespace(name='Bob')
        ns.age = 3
        assert str(ns) == "Namespace(age=3, name='Bob')", str(ns)
        assert repr(ns).startswith('<NamespaceProxy object, typeid \'Namespace\''), repr(ns)
        e = raises(AttributeError, lambda: ns.missing)
        assert 'missing' in str(e), str(e)
        raises(AttributeError, lambda: delattr(ns, 'missing'))
        del ns.age
        assert str(ns) == "Namespace(name='Bob')", str(ns)

    @scenario
    def array_ops():
        a = m.Array('i', [1, 2, 3])
        assert len(a) == 3 and a[0] == 1 and a[-1] == 3
        a[1] = 5
        assert list(a[:]) == [1, 5, 3], a[:]
        assert list(a[::2]) == [1, 3]
        a[0:2] = array.array('i', [7, 8])
        assert list(a[:]) == [7, 8, 3], a[:]
        raises(IndexError, lambda: a[5])
        raises(TypeError, lambda: a.__setitem__(0, 'x'))
        d = m.Array('d', [0.5, 1.5])
        assert d[1] == 1.5 and len(d) == 2

    @scenario
    def value_typecodes():
        cases = [('c', b'x'), ('u', 'x'), ('b', -1), ('B', 1), ('h', -2), ('H', 2),
                 ('i', -3), ('I', 3), ('l', -4), ('L', 4), ('q', -5), ('Q', 5),
                 ('f', 0.5), ('d', 1.5), ('?', True), ('O', [1])]
        for code, v in cases:
            val = m.Value(code, v)
            assert val.value == v, (code, val.value)
            val.value = v
            assert val.get() == v, (code, val.get())

    @scenario
    def set_ops():
        s = m.set({1, 2})
        s.add(3)
        assert 3 in s and len(s) == 3
        s.discard(1)
        s.update([4, 5])
        assert s.union({9}) == {2, 3, 4, 5, 9}
        assert s.intersection({2, 5, 7}) == {2, 5}
        assert s.difference({2}) == {3, 4, 5}
        assert s & {3, 4} == {3, 4} and s | {0} == {0, 2, 3, 4, 5}
        assert s - {2} == {3, 4, 5} and s ^ {2, 7} == {3, 4, 5, 7}
        assert s.issubset({2, 3, 4, 5, 6}) and s.issuperset({2}) and s.isdisjoint({8})
        s |= {10}
        s -= {2}
        assert s.copy() == {3, 4, 5, 10}, s.copy()
        raises(KeyError, lambda: s.remove(99))
        assert sorted(iter(s)) == [3, 4, 5, 10]
        assert s.pop() in {3, 4, 5, 10} and len(s) == 3
        s.clear()
        assert len(s) == 0

    @scenario
    def pool():
        # CPython's server runs a real Pool; ours cannot run Python code and must say so.
        try:
            p = m.Pool(1)
        except RemoteError as e:
            assert 'Pool' in str(e) and 'Python' in str(e), str(e)
            return 'refused: %s' % last_line(e)
        assert p.apply(abs, (-3,)) == 3
        return 'served'

    @scenario
    def joinable_queue_join_across_clients():
        ctx = multiprocessing.get_context('fork')
        q = m.JoinableQueue()
        q.put('a')
        q.put('b')
        p = ctx.Process(target=_drain, args=(q,))
        p.start()
        q.join()
        p.join(LONG)
        assert p.exitcode == 0 and q.empty()

    @scenario
    def condition_wait_for():
        c = m.Condition()
        flag = m.Value('b', 0)

        def setter():
            with c:
                flag.value = 1
                c.notify_all()
        with c:
            t = threading.Thread(target=setter)
            t.start()
            assert c.wait_for(lambda: flag.value == 1, timeout=LONG)
        t.join(LONG)

    @scenario
    def condition_remote_predicate_refused():
        c = m.Condition()
        c.acquire()
        e = raises(Exception, lambda: c._callmethod('wait_for', (len,)))
        c.release()
        return type(e).__name__

    @scenario
    def barrier_action():
        # CPython's server runs the callable; ours cannot run Python code and must say so.
        try:
            b = m.Barrier(1, action=print)
        except RemoteError as e:
            assert 'Python' in str(e), str(e)
            return 'refused: %s' % last_line(e)
        assert b.wait(timeout=LONG) == 0
        return 'served'

    @scenario
    def every_typeid():
        made = []
        for typeid, args in [('Queue', ()), ('JoinableQueue', ()), ('Event', ()),
                             ('Lock', ()), ('RLock', ()), ('Semaphore', ()),
                             ('BoundedSemaphore', ()), ('Condition', ()), ('Barrier', (2,)),
                             ('list', ()), ('dict', ()), ('Value', ('i', 1)),
                             ('Array', ('i', [1])), ('Namespace', ()), ('set', ())]:
            made.append(getattr(m, typeid)(*args))
        assert len(made) == 15

    @scenario
    def events_locks():
        ev = m.Event()
        assert not ev.is_set()
        ev.set()
        assert ev.wait(1) and ev.is_set()
        for lk in (m.Lock(), m.RLock(), m.Semaphore(2), m.BoundedSemaphore(1)):
            assert lk.acquire(timeout=1)
            lk.release()
        raises(ValueError, lambda: m.BoundedSemaphore(1).release())

    print('passed: %d/%d' % (sum(RESULTS), len(RESULTS)), flush=True)


def _child(lst, d, q):
    lst.append('child')
    d['from_child'] = 42
    d['q'].put('via nested queue')
    d['nested'].append('child')
    q.put('child done')


def _drain(q):
    for _ in range(2):
        q.get(timeout=LONG)
        q.task_done()


def main():
    if sys.argv[1] == 'serve':
        serve(sys.argv[2].encode())
        return
    host, port, key = sys.argv[2], int(sys.argv[3]), sys.argv[4].encode()
    # Proxies unpickled in this process and its forked children use this key.
    multiprocessing.current_process().authkey = key
    m = SyncManager(address=(host, port), authkey=key)
    m.connect()
    try:
        run(m)
    except Exception:
        traceback.print_exc()
        sys.exit(1)


if __name__ == '__main__':
    main()
