namespace DmaBroker.Core.Sessions;

/// <summary>
/// Rundown protection (as in Windows' ExAcquireRundownProtection): operations enter and exit
/// freely until a rundown begins; after that no operation enters, and the rundown completes
/// once the last one in flight has left. This is how a session's teardown knows that none of
/// its calls or DMA is still running before it releases ownership.
/// </summary>
internal sealed class RundownGate
{
    private const int RundownFlag = int.MinValue;
    private readonly TaskCompletionSource _drained = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private int _state;

    public bool IsRunDown => Volatile.Read(ref _state) < 0;

    /// <summary>A rundown began and the last operation in flight has left: nothing of the owner runs any more.</summary>
    public bool IsDrained => _drained.Task.IsCompleted;

    public bool TryEnter()
    {
        while (true)
        {
            var state = Volatile.Read(ref _state);
            if (state < 0)
                return false;
            if (Interlocked.CompareExchange(ref _state, state + 1, state) == state)
                return true;
        }
    }

    public void Exit()
    {
        if (Interlocked.Decrement(ref _state) == RundownFlag)
            _drained.TrySetResult();
    }

    /// <summary>Stops new entries; completes when every entered operation has exited.</summary>
    public Task RundownAsync()
    {
        var previous = Interlocked.Or(ref _state, RundownFlag);
        if (previous == 0 || previous == RundownFlag)
            _drained.TrySetResult();
        return _drained.Task;
    }
}
