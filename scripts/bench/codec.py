# Python side of codec.sh: pickle protocol 5 on the same data, same output format.
import pickle, time

def cases():
    yield "ints_100k", list(range(100000)), 40
    yield "records_10k", [{"id": i, "name": "user%d" % i, "score": i * 1.5, "tags": ["a", "b"]}
                          for i in range(10000)], 20
    yield "string_10mb", b"x" * (10 * 1024 * 1024), 20
    yield "small_table", [1, 2, 3], 100000

def best(fn, n):
    b = float("inf")
    for _ in range(3):
        t0 = time.process_time()
        for _ in range(n):
            fn()
        b = min(b, (time.process_time() - t0) / n)
    return b

for name, v, n in cases():
    s = pickle.dumps(v, protocol=5)
    d = best(lambda: pickle.dumps(v, protocol=5), n)
    l = best(lambda: pickle.loads(s), n)
    print("%s %.9f %.9f %d %d" % (name, d, l, len(s), n))
