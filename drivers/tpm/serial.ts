// One command at a time, in order: a TPM (a TIS FIFO, a device fd, a socket) runs one
// command per connection, so a transport with an event-loop caller queues the rest. The
// manager serialises its table changes on the same queue.
export class CommandQueue {
  private tail: Promise<unknown> = Promise.resolve();
  private busy = 0;

  /** Run `fn` after everything queued before it; a free queue runs it at once (no
   *  microtask turn before the command starts). */
  run<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.busy ? this.tail.then(fn) : fn();
    this.busy++;
    this.tail = run.then(this.done, this.done);
    return run;
  }

  /** Resolves once everything queued so far has finished (successfully or not). */
  async idle(): Promise<void> {
    await this.tail;
  }

  private readonly done = (): void => {
    this.busy--;
  };
}
