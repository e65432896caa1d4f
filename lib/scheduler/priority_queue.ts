/**
 * A binary min-heap. Used by the scheduler to order ready requests by
 * priority, then arrival.
 *
 * @module
 */

/** A min-heap ordered by `less`. */
export class PriorityQueue<T> {
  readonly #items: T[] = [];
  readonly #less: (a: T, b: T) => boolean;

  constructor(less: (a: T, b: T) => boolean) {
    this.#less = less;
  }

  push(item: T): void {
    const items = this.#items;
    items.push(item);
    let i = items.length - 1;
    while (i > 0) {
      const parent = (i - 1) >> 1;
      if (!this.#less(items[i], items[parent])) break;
      [items[i], items[parent]] = [items[parent], items[i]];
      i = parent;
    }
  }

  pop(): T | undefined {
    const items = this.#items;
    const top = items[0];
    const last = items.pop();
    if (items.length === 0 || last === undefined) return top;
    items[0] = last;
    let i = 0;
    for (;;) {
      const left = 2 * i + 1;
      const right = left + 1;
      let smallest = i;
      if (left < items.length && this.#less(items[left], items[smallest])) smallest = left;
      if (right < items.length && this.#less(items[right], items[smallest])) smallest = right;
      if (smallest === i) break;
      [items[i], items[smallest]] = [items[smallest], items[i]];
      i = smallest;
    }
    return top;
  }

  /** Removes every item `predicate` holds for; returns them. O(n). */
  remove(predicate: (item: T) => boolean): T[] {
    const removed = this.#items.filter(predicate);
    if (removed.length === 0) return removed;
    const kept = this.#items.filter((item) => !predicate(item));
    this.#items.length = 0;
    for (const item of kept) this.push(item);
    return removed;
  }
}
