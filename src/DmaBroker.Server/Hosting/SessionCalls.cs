namespace DmaBroker.Server.Hosting;

/// <summary>
/// The Session.Open calls in progress, so that stopping can wait until each has told its client
/// <c>revoked</c> and completed before the server stops: see <see cref="SessionShutdown"/>.
/// </summary>
public sealed class SessionCalls : IDisposable
{
    private readonly Lock _sync = new();
    private readonly CancellationTokenSource _overdue = new();
    private int _open;
    private TaskCompletionSource? _none;

    /// <summary>
    /// Cancelled once stopping has waited its grace for the calls: a call still waiting (for its
    /// client to close its side, or to write to it) stops waiting and completes.
    /// </summary>
    public CancellationToken Overdue => _overdue.Token;

    /// <summary>Tells the calls still in progress that stopping waits for them no longer (<see cref="Overdue"/>).</summary>
    public void CutOverdue() => _overdue.Cancel();

    /// <summary>Counts one call until the scope is disposed.</summary>
    public Scope Enter()
    {
        lock (_sync)
            _open++;
        return new Scope(this);
    }

    /// <summary>Completes once no call is in progress.</summary>
    public Task WhenNoneAsync()
    {
        lock (_sync)
            return _open == 0 ? Task.CompletedTask : (_none ??= new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously)).Task;
    }

    private void Exit()
    {
        TaskCompletionSource? none = null;
        lock (_sync)
        {
            if (--_open == 0)
                (none, _none) = (_none, null);
        }
        none?.TrySetResult();
    }

    /// <summary>Releases the <see cref="Overdue"/> token's source, once the server has stopped.</summary>
    public void Dispose() => _overdue.Dispose();

    /// <summary>One call in progress.</summary>
    public readonly struct Scope(SessionCalls calls) : IDisposable
    {
        public void Dispose() => calls.Exit();
    }
}
